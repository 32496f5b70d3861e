"""``python -m sc_tune.tiny --model_type MODEL_TYPE --output_dir DIR``."""

from sc_tune.tiny import main

main()
