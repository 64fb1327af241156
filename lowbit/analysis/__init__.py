"""Back-of-envelope arithmetic for decoder-only transformers: parameters, memory, FLOPs,
arithmetic intensity and roofline bounds. Pure functions of a ModelConfig; no torch needed."""
from lowbit.analysis.flops import (Flops, attention_flops, decode_flops, generation_flops,
                                   generation_flops_summary, linear_flops_per_token,
                                   lm_head_flops_per_token, prefill_flops)
from lowbit.analysis.gpus import GPUS, GPUSpec, get_gpu
from lowbit.analysis.memory import (QUANTIZED_SCOPE, Linear, ParamCounts, activation_memory,
                                    block_linears, kv_cache_bytes, kv_cache_bytes_per_token,
                                    kv_cache_summary, lm_head_linear, param_counts, params_total,
                                    weight_memory, weight_memory_table)
from lowbit.analysis.report import analyse, fmt_bytes, fmt_count, fmt_flops, fmt_time, render
from lowbit.analysis.roofline import (OpCost, decode_bound, linear_cost, op_costs, op_table,
                                      prefill_bound, ridge_point)

__all__ = [
    "Flops", "attention_flops", "decode_flops", "generation_flops", "generation_flops_summary",
    "linear_flops_per_token", "lm_head_flops_per_token", "prefill_flops",
    "GPUS", "GPUSpec", "get_gpu",
    "QUANTIZED_SCOPE", "Linear", "ParamCounts", "activation_memory", "block_linears",
    "kv_cache_bytes", "kv_cache_bytes_per_token", "kv_cache_summary", "lm_head_linear",
    "param_counts", "params_total", "weight_memory", "weight_memory_table",
    "analyse", "render", "fmt_bytes", "fmt_count", "fmt_flops", "fmt_time",
    "OpCost", "decode_bound", "linear_cost", "op_costs", "op_table", "prefill_bound", "ridge_point",
]
