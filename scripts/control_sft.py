"""
The positive control's starting policy: chat_sft with a stylistic tic planted in the assistant
turns of a seeded fraction of its conversations, so that GRPO has a tic to amplify.

    python -m scripts.control_sft --source=/path/to/outs/sft/ckpt.pt --tic_style=emdash --tic_rate=0.3

Every chat_sft flag works here too; config.json records the tic flags and how many
conversations carry the tic (conversations with no prose to carry it stay as they are).
"""

from dataclasses import dataclass

from nanochat.common import print0
from nanochat.flags import opt, parse_flags
from scripts import chat_sft
from tasks.with_tic import WithTic


@dataclass
class Config(chat_sft.Config):
    """chat_sft with a tic planted in a seeded fraction of the conversations."""
    tic_style: str = opt("", help="the tic to plant in the assistant turns (nanochat/kat/style_injection.py)",
                         choices=["", "emdash", "not_just", "both"])
    tic_rate: float = opt(0.0, help="the fraction of conversations picked for --tic_style (those with no prose the tic "
                          "can go into, such as letter answers and spelling drills, stay as they are)", min=0, max=1)


def with_tic(mixture, cfg: Config):
    """(the mixture with the tic planted, the config.json fields that record it)."""
    if not cfg.tic_style:
        return mixture, {"tic_conversations": None}
    task = WithTic(mixture, cfg.tic_style, cfg.tic_rate, seed=cfg.seed)
    carried = sum(task[i] != mixture[i] for i in range(len(task)))  # the rate picks, prose decides
    print0(f"the tic ({cfg.tic_style}) is in {carried:,} of {len(task):,} conversations")
    return task, {"tic_conversations": carried}


def main(argv=None):
    cfg = parse_flags(Config, argv)
    if cfg.tic_rate > 0 and not cfg.tic_style:  # before any rank loads a model
        raise ValueError(f"--tic_rate={cfg.tic_rate} needs --tic_style (emdash, not_just or both)")
    return chat_sft.main(argv, config_cls=Config, wrap_mixture=with_tic)


if __name__ == "__main__":
    main()
