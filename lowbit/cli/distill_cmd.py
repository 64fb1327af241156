"""`lowbit distill`: knowledge distillation (white-box or black-box) from a teacher into a student."""
from __future__ import annotations

from lowbit.cli.common import add_strict_arg, check_out_free, console


def add_parser(sub) -> None:
    from lowbit.quant.options import add_config_flags
    from lowbit.train.distill import DistillConfig

    p = sub.add_parser("distill", help="distil a teacher into a shallower or quantized student",
                       description="Train a student on a teacher: white-box (its output distributions, and with "
                                   "--feature-loss its hidden states), black-box (text it generates), or plain "
                                   "cross-entropy on the same text (--mode ce, the baseline).")
    p.add_argument("--teacher", default=None, help="teacher: HF directory or GGUF file (default SmolLM2-135M-Instruct)")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--student", help="student directory (e.g. the teacher quantized by lowbit quantize)")
    who.add_argument("--student-blocks", help="student = the teacher's blocks at these indices, e.g. 0,2,4 or every-2")
    p.add_argument("--data", required=True, help="training text file (black-box: prompts are drawn from it)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("-o", "--out", required=True, help="output directory")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    add_strict_arg(p)
    add_config_flags(p.add_argument_group("training options"), DistillConfig)
    p.set_defaults(run=run)


def run(args) -> int:
    from lowbit.cli.qat_cmd import check_data, print_log
    from lowbit.models.loader import load
    from lowbit.quant.options import config_from_args
    from lowbit.train.distill import DistillConfig, parse_blocks, run_distill, shallow_copy

    cfg = config_from_args(DistillConfig, args)
    check_out_free(args)
    check_data(args.data, self_ok=False)
    teacher, tok = load(args.teacher, dtype="fp32", device=args.device, strict=args.strict)
    if args.student_blocks:
        student = shallow_copy(teacher, parse_blocks(args.student_blocks, teacher.config.num_layers))
    else:
        student, _ = load(args.student, dtype="fp32", device=args.device, strict=args.strict)
    log, data = run_distill(teacher, student, tok, cfg, args.data, device=args.device)
    method = {"method": "distill", **cfg.to_dict(), "student_blocks": getattr(student, "block_map", None),
              "training": log.to_dict()}
    qcfg = getattr(student, "quantization_config", None) or {}
    out = student.save_pretrained(args.out, tok, method={**qcfg.get("method", {}), "distill": method}
                                  if qcfg else method, calibration=data, overwrite=args.force,
                                  kv_cache=qcfg.get("kv_cache"))
    print_log(f"distill ({cfg.mode}) into {student.config.num_layers} blocks on {data['source']}", log, out)
    console().print(f"student: {sum(p.numel() for p in student.parameters()):,} parameters")
    return 0
