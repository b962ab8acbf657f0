"""Pix2Seq-style sequence detector, pre-trained by maximum likelihood and tuned with a task reward (seeds 000, 003).

  images [B, H, W, 3] 0..255 -> encoder (small CNN or ResNet-50, + Transformer layers) -> memory [B, S, D]
  -> autoregressive Transformer decoder over the tokens of `tfreward.ops.sequence` (6 per box:
     ymin, xmin, ymax, xmax, class, conf) -> L = 6 * num_boxes tokens.

Modes (`Pix2SeqOptions.mode`; both share every weight, so a reward run starts from an MLE run's weights file):
  "mle":    teacher-forced cross-entropy (`loss_mle`) on the ground truth in random, raster or fixed object order,
            conf token `max_conf`, then filler slots (`pix2seq_targets`): Pix2Seq's noise boxes with conf token 0
            (default), or empty slots that teach the model to stop.
  "reward": sample `num_samples` sequences per image inside the step (`tfreward.ops.sampling`, no gradient), reward
            them (`tfreward.rewards.detection`), REINFORCE on sample 0 (or on every sample, `reinforce_samples:
            all`) with the leave-one-out baseline (or the greedy sequence's reward, `baseline: greedy`) plus the
            confidence loss (`tfreward.losses.reinforce`; weights 1 and `conf_weight`, `conf_detach` keeps it out of
            the decoder states); `freeze_encoder` tunes the decoder alone. `reinforce_samples: deviations` instead
            resamples one token of the greedy sequence at a time (`reinforce.deviation_loss`) and logs the greedy
            sequence's reward. Logs `reward`; `fit` adds
            `RewardStatsCallback` (`recipe_callbacks`) for per-threshold rewards, matches and duplicate penalties.
Log-probabilities in both modes are restricted to each position's token kind, the distribution the sampler draws from.

Randomness inside the step (object order, samples) is stateless: the seed is `fold_in(fold_in((seed, salt), step),
replica id)` with step = the optimizer's iteration counter, so a run is reproducible and replicas draw differently.
`compute_losses(..., samples=...)` takes given samples instead (the path that compares replica layouts).

`detect` decodes one sequence per image inside XLA (greedy, or sampled with `decode="sample"`) and returns every slot
as a detection, scored by the expected IoU its conf-token distribution implies; fixed size K = num_boxes.
"""

import dataclasses
from typing import Optional, Union

import keras
import tensorflow as tf

from tfreward.config import ConfigError
from tfreward.errors import check_int
from tfreward.losses import reinforce
from tfreward.models import pix2seq_layers as layers
from tfreward.models import options as checks
from tfreward.models import pix2seq_targets
from tfreward.models.base import TaskModel
from tfreward.ops import distributed
from tfreward.ops import sampling
from tfreward.ops import sequence
from tfreward.rewards import detection
from tfreward.training.reward_callback import RewardStatsCallback

_SALT_TARGET, _SALT_SAMPLES, _SALT_DETECT = 1, 2, 3


@dataclasses.dataclass
class Pix2SeqOptions:
  """`model:` keys of the pix2seq family."""
  mode: str = "mle"  # "mle" or "reward"
  # Tokens.
  max_level: int = 1000  # coordinate bins
  max_conf: int = 2  # conf tokens 0..max_conf
  num_boxes: int = 100  # box slots per sequence: L = 6 * num_boxes
  order: str = "random"  # MLE object order: "random", "raster" (top-left corners, row by row) or "fixed"
  filler: str = "noise"  # MLE slots after the objects: "noise" (Pix2Seq augmentation) or "empty"
  # Encoder.
  encoder: str = "cnn"  # "cnn" or "resnet50"
  encoder_width: int = 32  # cnn: channels of the first stage
  encoder_stages: int = 3  # cnn: stride 2**stages
  encoder_layers: int = 1  # Transformer layers on the image tokens
  box_attention: bool = True  # class and conf tokens attend inside their box (see pix2seq_layers.SequenceDecoder)
  # Decoder.
  dim: int = 256
  decoder_layers: int = 4
  num_heads: int = 8
  mlp_ratio: int = 4
  # Decoding in `detect`.
  decode: str = "greedy"  # "greedy" or "sample"
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  # Reward tuning.
  num_samples: int = 8  # N sequences per image: one trained, the others form its baseline
  sample_temperature: float = 1.0
  sample_top_k: int = 0
  sample_top_p: float = 1.0
  conf_weight: float = 0.3  # conf_w
  reinforce_conf: bool = True  # conf tokens in the REINFORCE term (the paper's choice; see losses.reinforce)
  reinforce_samples: str = "first"  # train on sample 0 ("first", the seed's form), on all N samples ("all"), or
  # ("best") imitate the reward-best of the greedy sequence and the samples of each image (advantage 1, no baseline),
  # or ("deviations") REINFORCE on one-token deviations from the greedy sequence: num_samples draws per position,
  # each against the greedy sequence's reward (`reinforce.deviation_loss`)
  baseline: str = "leave_one_out"  # or "greedy": the reward of the greedy sequence (self-critical)
  credit: str = "sequence"  # "sequence": every token gets its sequence's advantage (the seed); "slot": the tokens
  # of box slot k get the reward earned from slot k on (`reinforce.slot_returns`) minus its baseline; "box": the
  # reward slot k adds to the slots before it (`reinforce.box_rewards`; biased: ignores its effect on later slots)
  freeze_encoder: bool = False  # reward mode: no gradient into the encoder (the decoder alone is tuned)
  conf_detach: bool = False  # the confidence loss trains the output layer only, not the decoder states
  reinforce_padding: bool = True  # coords and class of slots sampled as padding in REINFORCE (seed: yes)
  advantage_floor: Optional[float] = None  # clip advantages from below, e.g. 0: only samples better than the baseline
  mle_weight: float = 0.0  # reward mode: + mle_weight * the MLE loss on the ground truth (an anchor; seed: none)
  mle_tokens: str = "all"  # the anchor's positions: "all", or "conf" (objectness only; boxes and classes left free)
  nms_w: float = 0.3
  cls_smooth: float = 0.05
  reward_thr: tuple[float, ...] = detection.PAPER_REWARD_THR
  correct_thr: float = 0.5
  cls_counts: Union[str, list[int]] = "uniform"  # "uniform", "coco" or one count per class
  legacy_threshold_keys: bool = False
  seed: int = 0

  def __post_init__(self):
    choices = {"mode": ("mle", "reward"), "order": ("random", "raster", "fixed"), "filler": ("noise", "empty"),
               "encoder": ("cnn", "resnet50"), "decode": ("greedy", "sample"),
               "reinforce_samples": ("first", "all", "best", "deviations"), "baseline": ("leave_one_out", "greedy"),
               "credit": ("sequence", "slot", "box"), "mle_tokens": ("all", "conf")}
    for name, valid in choices.items():
      checks.check_choice(name, getattr(self, name), valid)
    checks.check_at_least(self, ("max_level", "max_conf", "num_boxes", "encoder_width", "encoder_stages", "dim",
                                 "decoder_layers", "num_heads", "mlp_ratio"))
    checks.check_at_least(self, ("encoder_layers", "top_k", "sample_top_k"), 0)
    if self.dim % self.num_heads or self.dim % 4:
      raise ConfigError(f"model.dim must be a multiple of 4 and of model.num_heads, got {self.dim!r} and "
                        f"{self.num_heads!r}.")
    checks.check_number("mle_weight", self.mle_weight, 0)
    checks.check_number("advantage_floor", self.advantage_floor, allow_none=True)
    if self.credit != "sequence" and self.reinforce_samples == "best":
      raise ConfigError(f"model.credit {self.credit!r} needs advantages; model.reinforce_samples 'best' imitates "
                        "without them.")
    if self.reinforce_samples == "deviations" and (self.credit != "sequence" or self.baseline != "leave_one_out"
                                                   or self.advantage_floor is not None):
      raise ConfigError("model.reinforce_samples 'deviations' credits each token against the greedy sequence; "
                        f"it takes no model.credit ({self.credit!r}), baseline ({self.baseline!r}) or "
                        f"advantage_floor ({self.advantage_floor!r}).")
    if self.num_samples < 2:
      raise ConfigError(f"model.num_samples must be >= 2 (the baseline needs another sample), got "
                        f"{self.num_samples!r}.")
    for name in ("temperature", "sample_temperature"):
      if getattr(self, name) <= 0:
        raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)!r}.")
    for name in ("top_p", "sample_top_p"):
      if not 0 < getattr(self, name) <= 1:
        raise ConfigError(f"model.{name} must be in (0, 1], got {getattr(self, name)!r}.")
    for name in ("box_attention", "reinforce_conf", "freeze_encoder", "conf_detach", "reinforce_padding"):
      if not isinstance(getattr(self, name), bool):
        raise ConfigError(f"model.{name} must be true or false, got {getattr(self, name)!r}.")
    if isinstance(self.cls_counts, str) and self.cls_counts not in ("uniform", "coco"):
      raise ConfigError(f"model.cls_counts must be 'uniform', 'coco' or a list of counts, got {self.cls_counts!r}.")


class Pix2Seq(TaskModel):
  """Sequence detector (see the module docstring).

  Args:
    num_classes: int. Object classes.
    image_size: (int, int). Canvas height and width.
    options: `Pix2SeqOptions` or a dict of its fields. Defaults to `Pix2SeqOptions()`.
    loss_weights: optional dict; defaults to {"loss_mle": 1} ("mle") or {"loss_reward": 1, "loss_conf": conf_weight}.
    clip_norm: float or None. See `TaskModel`.
  """

  def __init__(self, *, num_classes, image_size, options=None, loss_weights=None, **kwargs):
    check_int("num_classes", num_classes)
    if options is None:
      options = Pix2SeqOptions()
    elif isinstance(options, dict):
      options = Pix2SeqOptions(**options)
    elif not isinstance(options, Pix2SeqOptions):
      raise ValueError(f"options must be a Pix2SeqOptions or a dict, got {options!r}.")
    o = options
    if o.mode == "mle":
      self.log_names = ("loss_mle",)
      default_weights = {"loss_mle": 1.0}
    else:
      self.log_names = ("loss_reward", "loss_conf", "reward")
      default_weights = {"loss_reward": 1.0, "loss_conf": o.conf_weight}
      if o.mle_weight:
        self.log_names += ("loss_mle",)
        default_weights["loss_mle"] = float(o.mle_weight)
    super().__init__(image_size=image_size, loss_weights=loss_weights or default_weights, **kwargs)
    self.num_classes, self.options = num_classes, o
    self.layout = dict(max_level=o.max_level, max_conf=o.max_conf, num_cls=num_classes)
    self.vocab_size = sequence.TokenLayout(**self.layout).vocab_size
    self.seq_len = sequence.TOKENS_PER_BOX * o.num_boxes
    counts = o.cls_counts
    if counts == "coco":
      counts = detection.COCO_CLS_COUNTS
    elif counts == "uniform":
      counts = (1,) * num_classes
    if len(counts) != num_classes:
      raise ValueError(f"cls_counts must have num_classes={num_classes} entries, got {o.cls_counts!r}.")
    self.reward_config = dict(nms_w=o.nms_w, cls_smooth=o.cls_smooth, reward_thr=tuple(o.reward_thr),
                              correct_thr=o.correct_thr, cls_counts=tuple(int(c) for c in counts),
                              legacy_threshold_keys=o.legacy_threshold_keys, **self.layout)
    self.thresholds = tuple(sorted(set(float(t) for t in o.reward_thr)))
    self.stat_trackers = {}
    if o.mode == "reward":
      names = ("num_matches", "nms_penalty") + tuple(self._thr_name(t) for t in self.thresholds)
      self.stat_trackers = {n: keras.metrics.Mean(name=n) for n in names}
    # === Layers ===
    if o.encoder == "cnn":
      self.encoder = layers.ConvEncoder(dim=o.dim, width=o.encoder_width, num_stages=o.encoder_stages,
                                        num_layers=o.encoder_layers, num_heads=o.num_heads, mlp_ratio=o.mlp_ratio,
                                        name="encoder")
    else:
      self.encoder = layers.ResNetEncoder(dim=o.dim, image_size=self.image_size, num_layers=o.encoder_layers,
                                          num_heads=o.num_heads, mlp_ratio=o.mlp_ratio, name="encoder")
    memory_hw = self.encoder.feature_hw(self.image_size) if o.box_attention else None
    self.decoder = layers.SequenceDecoder(
        vocab_size=self.vocab_size, seq_len=self.seq_len, dim=o.dim, num_layers=o.decoder_layers,
        num_heads=o.num_heads, mlp_ratio=o.mlp_ratio, memory_hw=memory_hw, name="decoder",
        coord_tokens=sequence.TokenLayout(**self.layout).token_range(sequence.COORD))

  @staticmethod
  def _thr_name(threshold):
    return f"reward_{round(threshold * 100):02d}"

  def call(self, images, training=False):
    """Builds every layer: teacher-forced logits [B, L, V] float32 of an all-start-token input."""
    memory = self.encoder(images, training=training)
    inputs = tf.fill([tf.shape(images)[0], self.seq_len], self.decoder.bos_token)
    return self.decoder(inputs, memory)

  # === Randomness and decoding ===

  def step_seed(self, salt):
    """[2] int64 stateless seed of this step and replica (see the module docstring)."""
    optimizer = getattr(self, "optimizer", None)
    step = optimizer.iterations if optimizer is not None else 0
    ctx = tf.distribute.get_replica_context()
    replica = ctx.replica_id_in_sync_group if ctx is not None else 0
    seed = sampling.fold_in(tf.constant([self.options.seed, salt], tf.int64), step)
    return sampling.fold_in(seed, replica)

  def sample(self, memory, *, num_samples, seed=None, greedy=False, temperature=1.0, top_k=0, top_p=1.0,
             return_logits=False):
    """Decodes from memory [B, S, D]: dict tokens [B, N, L] int32 (+ logits [B, N, L, V]); see `sample_sequences`."""
    return sampling.sample_sequences(
        self.decoder.step, self.decoder.init_cache(memory), seq_len=self.seq_len, start_token=self.decoder.bos_token,
        num_samples=num_samples, seed=seed, greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p,
        return_logits=return_logits, **self.layout)

  # === Losses ===

  def compute_losses(self, images, labels, training, samples=None):
    """Loss terms and statistics, this replica's shares.

    Args:
      images: [B, H, W, 3] uint8/float 0..255.
      labels: dict with boxes [B, M, 4] float32 normalised yxyx, classes [B, M] int32 (-1 padding), valid [B, M] bool.
      training: bool.
      samples: optional [B, N, L] int32 sequences to reward-tune on instead of sampling (reward mode only).
    """
    if samples is not None and self.options.mode != "reward":
      raise ValueError(f"samples are for reward mode, but this model is in {self.options.mode!r} mode.")
    memory = self.encoder(images, training=training)
    if self.options.mode == "mle":
      return self._mle_losses(memory, labels)
    if self.options.freeze_encoder:
      memory = tf.stop_gradient(memory)
    if self.options.reinforce_samples == "deviations":
      terms = self._deviation_losses(memory, labels, samples)
    else:
      if samples is None:
        samples = self.sample(tf.stop_gradient(memory), num_samples=self.options.num_samples,
                              seed=self.step_seed(_SALT_SAMPLES), temperature=self.options.sample_temperature,
                              top_k=self.options.sample_top_k, top_p=self.options.sample_top_p)["tokens"]
      greedy = None
      if self.options.baseline == "greedy" or self.options.reinforce_samples == "best":
        greedy = tf.stop_gradient(self.sample(tf.stop_gradient(memory), num_samples=1, greedy=True)["tokens"])
      terms = self._reward_losses(memory, labels, tf.stop_gradient(tf.cast(samples, tf.int32)), greedy)
    if self.options.mle_weight:
      terms.update(self._mle_losses(memory, labels, conf_only=self.options.mle_tokens == "conf"))
    return terms

  def _mle_losses(self, memory, labels, conf_only=False):
    target, weights = pix2seq_targets.mle_targets(
        labels["boxes"], labels["classes"], labels["valid"], num_boxes=self.options.num_boxes,
        filler=self.options.filler, order=self.options.order, seed=self.step_seed(_SALT_TARGET), **self.layout)
    if conf_only:
      weights *= tf.cast(sequence.token_kinds(self.seq_len) == sequence.CONF, weights.dtype)[None, :]
    logits = sequence.constrain_logits(self.decoder(self.decoder.shift_right(target), memory), **self.layout)
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=target, logits=logits)  # [B, L]
    count = distributed.global_sum(tf.reduce_sum(weights))
    return {"loss_mle": tf.reduce_sum(ce * weights) / tf.maximum(count, 1.0)}

  def _reward_losses(self, memory, labels, samples, greedy=None):
    """samples [B, N, L] int32; greedy: optional [B, 1, L] int32, the greedy sequences (`baseline: greedy` and
    `reinforce_samples: best`)."""
    gt = self._gt_sequence(labels)
    rewards, aux = detection.detection_reward(samples, gt, **self.reward_config)  # [B, N]
    if greedy is not None:
      greedy_rewards, greedy_aux = detection.detection_reward(greedy, gt, **self.reward_config)  # [B, 1]
    if self.options.reinforce_samples == "best":  # best-of-N imitation: the reward-best of greedy + samples
      candidate_rewards = tf.concat([greedy_rewards, rewards], axis=1)  # [B, 1 + N]
      best = tf.argmax(candidate_rewards, axis=1, output_type=tf.int32)  # [B]; ties go to the greedy sequence
      chosen = tf.gather(tf.concat([greedy, samples], axis=1), best, batch_dims=1)
      match_iou = tf.gather(tf.concat([greedy_aux["match_iou"], aux["match_iou"]], axis=1), best, batch_dims=1)
      advantages = tf.ones_like(candidate_rewards[:, 0])
    else:
      if self.options.credit != "sequence":  # [B, N, S] per-slot credit, each against the same slot's baseline
        credit = self._slot_credit(samples, gt, rewards)
        baseline = (reinforce.leave_one_out_baseline(credit) if greedy is None
                    else self._slot_credit(greedy, gt, greedy_rewards))  # [B, N or 1, S]
      else:
        credit = rewards
        baseline = reinforce.leave_one_out_baseline(rewards) if greedy is None else greedy_rewards  # [B, N or 1]
      advantages = credit - baseline
      if self.options.advantage_floor is not None:
        advantages = tf.maximum(advantages, float(self.options.advantage_floor))
      if self.options.reinforce_samples == "all":  # every sample, each with its own advantage
        num = samples.shape[1]
        chosen = tf.reshape(samples, [-1, self.seq_len])  # [B * N, L], row b * N + n
        memory = tf.repeat(memory, num, axis=0)
        advantages = tf.reshape(advantages, [-1] + advantages.shape[2:].as_list())  # [B * N] or [B * N, S]
        match_iou = tf.reshape(aux["match_iou"], [-1, self.options.num_boxes])
      else:  # sample 0, as the seed
        chosen, advantages, match_iou = samples[:, 0], advantages[:, 0], aux["match_iou"][:, 0]
    logits, features = self.decoder(self.decoder.shift_right(chosen), memory, return_features=True)  # [B', L, V]
    conf_logits = self.decoder.head_logits(tf.stop_gradient(features)) if self.options.conf_detach else None
    terms = reinforce.reinforce_losses(logits=logits, tokens=chosen, advantages=advantages, match_iou=match_iou,
                                       reinforce_conf=self.options.reinforce_conf, conf_logits=conf_logits,
                                       reinforce_padding=self.options.reinforce_padding, **self.layout)
    terms.update(self._reward_statistics(rewards, aux))
    return terms

  def _reward_statistics(self, rewards, aux):
    """rewards [B, N] and their `detection_reward` aux -> the logged means: reward, matches, duplicate penalty and
    the reward at each distinct threshold (replica shares)."""
    terms = {}
    count = tf.maximum(distributed.global_sum(tf.cast(tf.size(rewards), tf.float32)), 1.0)
    terms["reward"] = tf.reduce_sum(rewards) / count
    terms["num_matches"] = tf.reduce_sum(aux["num_matches"]) / count
    terms["nms_penalty"] = tf.reduce_sum(aux["nms_penalty"]) / count
    thr_index = [list(self.reward_config["reward_thr"]).index(t) for t in self.thresholds]
    per_thr = tf.reduce_sum(tf.gather(aux["reward_thr"], thr_index), axis=[1, 2]) / count  # [T distinct]
    for i, t in enumerate(self.thresholds):
      terms[self._thr_name(t)] = per_thr[i]
    return terms

  def _deviation_losses(self, memory, labels, given=None):
    """`reinforce_samples: deviations`. given: optional [B, 1 + K, L] int32: the greedy sequences, then K sets of
    drawn tokens (one per position), used instead of decoding and drawing (the path that compares replica layouts)."""
    o = self.options
    if given is None:
      greedy = self.sample(tf.stop_gradient(memory), num_samples=1, greedy=True)["tokens"][:, 0]  # [B, L]
    else:
      greedy = given[:, 0]
    greedy = tf.stop_gradient(tf.cast(greedy, tf.int32))
    logits, features = self.decoder(self.decoder.shift_right(greedy), memory, return_features=True)  # [B, L, V]
    logits = sequence.constrain_logits(tf.cast(logits, tf.float32), **self.layout)
    log_probs = tf.nn.log_softmax(logits, axis=-1)
    if given is None:
      policy = sampling.filter_logits(tf.reshape(tf.stop_gradient(logits), [-1, logits.shape[-1]]),
                                      temperature=o.sample_temperature, top_k=o.sample_top_k, top_p=o.sample_top_p)
      draws = sampling.gumbel_sample(tf.tile(policy, [o.num_samples, 1]), self.step_seed(_SALT_SAMPLES))
      actions = tf.transpose(tf.reshape(draws, [o.num_samples, -1, self.seq_len]), [1, 0, 2])  # [B, K, L]
    else:
      actions = tf.cast(given[:, 1:], tf.int32)
    actions = tf.stop_gradient(actions)
    gt = self._gt_sequence(labels)
    greedy_rewards, aux = detection.detection_reward(greedy[:, None], gt, **self.reward_config)  # [B, 1]
    num = actions.shape[1]
    deviations = tf.reshape(sequence.token_deviations(greedy, actions), [-1, num * self.seq_len, self.seq_len])
    deviation_rewards = detection.detection_reward(deviations, gt, **self.reward_config)[0]  # [B, K * L]
    advantages = tf.reshape(deviation_rewards, [-1, num, self.seq_len]) - greedy_rewards[:, :, None]  # [B, K, L]
    terms = {"loss_reward": reinforce.deviation_loss(log_probs=log_probs, actions=actions, advantages=advantages,
                                                     reinforce_conf=o.reinforce_conf)}
    conf_log_probs = log_probs
    if o.conf_detach:
      conf_logits = sequence.constrain_logits(self.decoder.head_logits(tf.stop_gradient(features)), **self.layout)
      conf_log_probs = tf.nn.log_softmax(tf.cast(conf_logits, tf.float32), axis=-1)
    terms["loss_conf"] = reinforce.confidence_loss(conf_log_probs, greedy, aux["match_iou"][:, 0],
                                                   max_conf=self.options.max_conf)
    terms.update(self._reward_statistics(greedy_rewards, aux))
    return terms

  def _gt_sequence(self, labels):
    """The ground truth as the reward reads it: [B, 6 * M] int32 in dataset order, one slot per object."""
    return sequence.boxes_to_sequence(labels["boxes"], labels["classes"], labels["valid"], order="fixed",
                                      seq_len=sequence.TOKENS_PER_BOX * labels["boxes"].shape[1], **self.layout)

  def _slot_credit(self, seqs, gt, rewards):
    """seqs [B, N, L] int32, gt [B, Lg], rewards [B, N] -> [B, N, S] float32 per-slot credit (`credit`): the reward
    earned from each slot on ("slot") or the reward each slot adds to the slots before it ("box")."""
    num, slots = seqs.shape[1], self.options.num_boxes
    prefixes = tf.reshape(sequence.slot_prefixes(seqs), [-1, num * slots, self.seq_len])  # [B, N * S, L]
    prefix_rewards = tf.reshape(detection.detection_reward(prefixes, gt, **self.reward_config)[0], [-1, num, slots])
    if self.options.credit == "box":
      return reinforce.box_rewards(rewards, prefix_rewards)
    return reinforce.slot_returns(rewards, prefix_rewards)

  # === Statistics ===

  @property
  def metrics(self):
    return super().metrics + list(self.stat_trackers.values())

  def _log(self, total, terms):
    for name, tracker in self.stat_trackers.items():
      tracker.update_state(distributed.global_sum(tf.cast(terms[name], tf.float32)))
    return super()._log(total, terms)

  def reward_statistics(self):
    """Running epoch means of the reward statistics (reward mode; empty in "mle" mode): dict name -> float."""
    if not self.stat_trackers:
      return {}
    stats = {"reward": float(self._trackers["reward"].result())}
    stats.update({name: float(t.result()) for name, t in self.stat_trackers.items()})
    return stats

  def recipe_callbacks(self, existing=()):
    """In reward mode, a `RewardStatsCallback` unless `existing` holds one. It writes batch-level scalars next to the
    `TensorBoard` logs among `existing` (`<log_dir>/reward`), if any."""
    if self.options.mode != "reward" or any(isinstance(c, RewardStatsCallback) for c in existing):
      return []
    board = [c for c in existing if isinstance(c, keras.callbacks.TensorBoard)]
    return [RewardStatsCallback(log_dir=f"{board[0].log_dir}/reward" if board else None)]

  # === Inference ===

  def detect(self, images):
    """images [B, H, W, 3] 0..255 -> fixed-size detections, K = num_boxes, sorted by score:
    boxes [B, K, 4] float32 normalised yxyx, scores [B, K] float32 (expected IoU from the conf tokens),
    classes [B, K] int32, num_detections [B] int32 (= K)."""
    o = self.options
    memory = self.encoder(images, training=False)
    out = self.sample(memory, num_samples=1, greedy=o.decode == "greedy", seed=tf.constant([o.seed, _SALT_DETECT]),
                      temperature=o.temperature, top_k=o.top_k, top_p=o.top_p, return_logits=True)
    tokens, logits = out["tokens"][:, 0], out["logits"][:, 0]  # [B, L], [B, L, V]
    # Every slot is a detection: score it with its conf distribution, whatever conf token was decoded.
    every_slot = tf.where(sequence.token_kinds(self.seq_len) == sequence.CONF, o.max_conf, tokens)
    found = sequence.sequence_to_detections(every_slot, logits=logits, **self.layout)
    ymin, xmin, ymax, xmax = tf.unstack(found["boxes"], axis=-1)
    boxes = tf.stack([tf.minimum(ymin, ymax), tf.minimum(xmin, xmax), tf.maximum(ymin, ymax),
                      tf.maximum(xmin, xmax)], axis=-1)
    order = tf.argsort(found["scores"], axis=-1, direction="DESCENDING", stable=True)
    return {
        "boxes": tf.gather(boxes, order, batch_dims=1),
        "scores": tf.gather(found["scores"], order, batch_dims=1),
        "classes": tf.gather(found["classes"], order, batch_dims=1),
        "num_detections": tf.fill([tf.shape(tokens)[0]], o.num_boxes),
    }

  # === Config ===

  def get_config(self):
    config = super().get_config()
    config.update(num_classes=self.num_classes, options=dataclasses.asdict(self.options))
    return config


def build(options: Pix2SeqOptions, *, num_classes, image_size, clip_norm=None):
  return Pix2Seq(num_classes=num_classes, image_size=image_size, options=options, clip_norm=clip_norm)
