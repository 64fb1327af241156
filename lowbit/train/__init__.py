"""Training-side compression: quantization-aware training (STE, LSQ, LLM-QAT's self-generated data) and
knowledge distillation (white-box and black-box), on top of the models, PTQ methods and generation below."""
