"""Pure ML code: dataset checks, the LoRA training script, the tiny base model. No temporalio."""
