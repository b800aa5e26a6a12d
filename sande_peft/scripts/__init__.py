"""trl-style training scripts, shared by `examples/*.py` and the `sande-peft` command."""
