"""The pix2seq family: a sequence detector pre-trained by maximum likelihood and tuned with a detection reward."""

from tfreward.models.pix2seq.model import Pix2Seq
from tfreward.models.pix2seq.options import Pix2SeqOptions, SamplingOptions

__all__ = ["Pix2Seq", "Pix2SeqOptions", "SamplingOptions"]
