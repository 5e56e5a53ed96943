"""Post-training: LoRA fine-tuning through peft (lora.py), distillation (distill.py) and int8 quantisation
with a measured report (quantize.py). Commands: `leanseq finetune`, `leanseq distill`, `leanseq quantize`.
peft is imported only where adapters are made or loaded."""
