"""Videos in: decoding real files (`video`) and the generated 'find the detail' task (`synthetic`),
both shaped for a preset. Labelled video sets for calibration, evaluation and training come here too."""
