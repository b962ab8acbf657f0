"""Entry point of the worker processes in test_multi_worker.py: `tfreward` itself, plus an optional fault.

  python multi_worker_main.py [--sigkill-after-epoch E | --mirrored-cpu N] tfreward-arguments...

--sigkill-after-epoch E: the process kills itself with SIGKILL at the end of epoch E (0-based), after the trainer's
callbacks (the chief's backup) ran: a worker lost between two epochs.
--mirrored-cpu N: one process trains on a MirroredStrategy over N logical CPU devices (the reference that N
single-replica workers must equal).
"""

import os
import signal
import sys

import keras

from tfreward import cli
from tfreward import strategy as strategies
from tfreward.training import trainer


class _SigkillAfterEpoch(keras.callbacks.Callback):

  def __init__(self, epoch):
    super().__init__()
    self.epoch = epoch

  def on_epoch_end(self, epoch, logs=None):
    if epoch == self.epoch:
      sys.stdout.flush()
      os.kill(os.getpid(), signal.SIGKILL)


def main(argv):
  if argv[:1] == ["--sigkill-after-epoch"]:
    fault = _SigkillAfterEpoch(int(argv[1]))
    argv = argv[2:]
    train = trainer.train
    trainer.train = lambda *args, **kwargs: train(*args, callbacks=[fault], **kwargs)
  elif argv[:1] == ["--mirrored-cpu"]:
    replicas = int(argv[1])
    argv = argv[2:]
    strategies.split_cpu(replicas)
    train = trainer.train
    trainer.train = lambda *args, **kwargs: train(*args, strategy=strategies.mirrored_cpu_strategy(replicas),
                                                  **kwargs)
  return cli.main(argv)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
