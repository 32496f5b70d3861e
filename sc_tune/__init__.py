"""SC-Tune: self-consistency tuning of vision-language models (describer <-> locator). See README.md."""
