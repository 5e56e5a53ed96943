"""Post-training: refine a trained model (LoRA, distillation, int8) and export it for the edge (ONNX, GGUF)."""
