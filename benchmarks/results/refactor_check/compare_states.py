import json, sys
for part in ("core", "methods"):
    try:
        o = json.load(open(f"benchmarks/results/refactor_check/old/{part}/state.json")); n = json.load(open(f"benchmarks/results/refactor_check/new/{part}/state.json"))
    except FileNotFoundError as e:
        print(part, "missing", e); continue
    ro, rn = o["results"], n["results"]
    for k in ro:
        a, b = ro[k], rn.get(k)
        if b is None: print(part, k, "missing in new"); continue
        same = all(a[f] == b[f] for f in ("nll", "base_nll", "kl", "top1", "tokens", "windows"))
        print(f"{part:8s} {k:45s} {'IDENTICAL' if same else 'DIFFERS'}  nll {a['nll']!r} vs {b['nll']!r}  kl {a['kl']!r} vs {b['kl']!r}")
