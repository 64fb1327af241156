"""compressed-tensors, the format llm-compressor writes and vLLM, SGLang and transformers load.

The quantization_config is built and validated by the package's own pydantic models (QuantizationConfig,
QuantizationScheme, QuantizationArgs); sub-byte codes are packed and unpacked by its own packer. What this
module adds is the mapping between those and lowbit's layers:

  lowbit layer                      format            tensors per Linear
  WeightOnlyLinear (int, k bits)    pack-quantized    weight_packed int32 [out, ceil(in*k/32)], weight_shape,
                                                      weight_scale [out, G] | [out, 1] | [1],
                                                      weight_zero_point int32 [ceil(out*k/32), G] (asym.)
  Int8Linear (W8A8 int8)            int-quantized     weight int8 [out, in], weight_scale [out, 1], input_scale
  FP8Linear (W8A8 e4m3)             float-quantized   weight fp8 [out, in], weight_scale [out, 1] | [1], input_scale

compressed-tensors codes are signed for every grid (int4: [-8, 7], zero point too); lowbit's asymmetric
grids are unsigned ([0, 15]), so the codes and zero points shift by 2^(k-1): (q - z) * s is unchanged.
"""
from __future__ import annotations

import re
from collections import defaultdict

import torch

from lowbit.errors import LowbitError
from lowbit.formats import divisor_hint
from lowbit.kernels.primitives import QuantSpec
from lowbit.layers import FP8Linear, Int8Linear, WeightOnlyLinear

CAN_HOLD = "compressed-tensors holds weight-only int (RTN, GPTQ, AWQ), W8A8 int8 and FP8 layers"


def _ct():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise LowbitError("--format compressed-tensors needs the compressed-tensors package: "
                          "pip install 'compressed-tensors>=0.20,<1'") from None
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    return QuantizationConfig, QuantizationScheme, QuantizationArgs, pack_to_int32, unpack_from_int32


# ----------------------------------------------------------------------------- export

def _refuse(name: str, layer) -> LowbitError:
    kind = type(layer).__name__
    what = {"MixedInt8Linear": "LLM.int8()'s outlier decomposition (--method llm_int8)",
            "FakeQuantLinear": "fake-quant (quantize-dequantize) layers, e.g. ZeroQuant's"}.get(kind, kind)
    return LowbitError(f"--format compressed-tensors: module {name} is {what}, which no compressed-tensors "
                       f"scheme expresses; use --format lowbit ({CAN_HOLD})")


def _weight_only_scheme(name: str, layer: WeightOnlyLinear, actorder: str | None) -> tuple[dict, str]:
    spec = layer.spec
    if spec.float_zero:
        raise LowbitError(f"--format compressed-tensors: module {name} has a real-valued zero offset "
                          f"(--zero-point float), which the format cannot hold; use an integer zero point or "
                          f"--format lowbit")
    if layer.g_idx is not None:
        if spec.group_size > 0 and layer.in_features % spec.group_size:
            raise LowbitError(
                f"--format compressed-tensors: module {name} has in_features={layer.in_features}, not a multiple "
                f"of --group-size {spec.group_size} (lowbit's short last group); vLLM and the compressed-tensors "
                f"kernels need group sizes that divide every width: use a divisor such as "
                f"{divisor_hint({layer.in_features})}, or --format lowbit")
        raise LowbitError(f"--format compressed-tensors: module {name} has act-order groups (g_idx), which "
                          f"compressed-tensors no longer stores (its actorder 'group' was removed); quantize "
                          f"with --act-order --static-groups (actorder 'weight'), or use --format gptq or lowbit")
    strategy = {-1: "channel", 0: "tensor"}.get(spec.group_size, "group")
    w = {"num_bits": spec.bits, "type": "int", "symmetric": spec.symmetric, "strategy": strategy,
         "group_size": spec.group_size if strategy == "group" else None, "dynamic": False}
    if actorder and strategy == "group":
        w["actorder"] = actorder
    return {"weights": w, "input_activations": None, "format": "pack-quantized"}, "pack-quantized"


def _w8a8_scheme(layer) -> tuple[dict, str]:
    is_fp8 = isinstance(layer, FP8Linear)
    typ = "float" if is_fp8 else "int"
    per_channel = getattr(layer, "per_channel", True)
    w = {"num_bits": 8, "type": typ, "symmetric": True, "strategy": "channel" if per_channel else "tensor",
         "group_size": None, "dynamic": False}
    # lowbit's dynamic activations: int8 per token; fp8 per tensor (or per token when imported so)
    if layer.static_act:
        a = {"strategy": "tensor", "dynamic": False}
    else:
        a = {"strategy": "token" if (not is_fp8 or getattr(layer, "per_token_act", False)) else "tensor",
             "dynamic": True}
    a = {"num_bits": 8, "type": typ, "symmetric": True, "group_size": None, **a}
    fmt = "float-quantized" if is_fp8 else "int-quantized"
    return {"weights": w, "input_activations": a, "format": fmt}, fmt


def _weight_only_tensors(layer: WeightOnlyLinear, pack_to_int32) -> dict[str, torch.Tensor]:
    spec, half = layer.spec, 1 << (layer.spec.bits - 1)
    q = layer.codes().to(torch.int16)  # [out, in]
    if not spec.symmetric:
        q = q - half  # unsigned [0, 2^k) -> the format's signed [-2^(k-1), 2^(k-1))
    t = {"weight_packed": pack_to_int32(q.to(torch.int8), spec.bits),  # [out, ceil(in*k/32)]
         "weight_shape": torch.tensor([layer.out_features, layer.in_features], dtype=torch.int64)}
    scale = layer.scale  # [rows, G]
    t["weight_scale"] = scale.reshape(1) if spec.group_size == 0 else scale.contiguous()  # tensor strategy: [1]
    if not spec.symmetric:
        z = (layer.zero.float().round().to(torch.int16) - half).to(torch.int8)  # [rows, G]
        # group/channel zero points are packed along the output dim; a per-tensor one stays int8 [1]
        t["weight_zero_point"] = z.reshape(1) if spec.group_size == 0 else pack_to_int32(z, spec.bits, packed_dim=0)
    return t


def _w8a8_tensors(layer) -> dict[str, torch.Tensor]:
    t = {"weight": layer.qweight, "weight_scale": layer.w_scale.reshape(-1, 1) if layer.w_scale.numel() > 1
         else layer.w_scale.reshape(1)}
    if layer.act_scale is not None:
        t["input_scale"] = layer.act_scale.reshape(1)
    return t


def export(model, method: dict | None = None):
    """(quantization_config, tensors) of `model`'s quantized Linears in compressed-tensors' layout."""
    QuantizationConfig, QuantizationScheme, _, pack_to_int32, _ = _ct()
    method = method or {}
    actorder = "weight" if method.get("act_order") and method.get("static_groups") else None
    if getattr(model, "kv_quant", None) is not None:
        raise LowbitError(f"--format compressed-tensors: --kv-cache {model.kv_quant.dtype} quantizes each token's "
                          f"keys/values with its own scale, and compressed-tensors' kv_cache_scheme holds static "
                          f"per-tensor scales only; drop --kv-cache (vLLM: --kv-cache-dtype) or use --format lowbit")
    schemes: dict[str, list[str]] = defaultdict(list)  # scheme (as a canonical repr) -> module names
    scheme_of, tensors, linears = {}, {}, []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            linears.append(name)
        if not hasattr(m, "layer_config"):
            continue
        if isinstance(m, WeightOnlyLinear):
            scheme, _ = _weight_only_scheme(name, m, actorder)
            local = _weight_only_tensors(m, pack_to_int32)
        elif type(m) in (Int8Linear, FP8Linear):
            scheme, _ = _w8a8_scheme(m)
            local = _w8a8_tensors(m)
        else:
            raise _refuse(name, m)
        if m.bias is not None:
            local["bias"] = m.bias
        key = repr(scheme)
        scheme_of[key] = scheme
        schemes[key].append(name)
        tensors.update({f"{name}.{k}": v.detach().contiguous().cpu() for k, v in local.items()})
    if not schemes:
        raise LowbitError("--format compressed-tensors: the model has no quantized layers to export")
    groups = {}
    single = len(schemes) == 1
    for i, (key, names) in enumerate(schemes.items()):
        # one scheme: every Linear but the ignored ones; several (mixed precision): each module by name
        targets = ["Linear"] if single else [f"re:^{re.escape(n)}$" for n in names]
        groups[f"group_{i}"] = QuantizationScheme(targets=targets, **scheme_of[key])
    fmts = {s["format"] for s in scheme_of.values()}
    quantized = _modules_of(tensors)
    qc = QuantizationConfig(config_groups=groups, ignore=[n for n in linears if n not in quantized],
                            format=fmts.pop() if len(fmts) == 1 else "mixed-precision",
                            quantization_status="compressed")
    import compressed_tensors
    cfg = {"quant_method": "compressed-tensors", "version": compressed_tensors.__version__,
           "sparsity_config": {}, "transform_config": {}, **qc.model_dump(exclude=["quant_method"])}
    cfg["quantization_status"] = "compressed"
    return cfg, tensors


def _modules_of(tensors: dict) -> set[str]:
    return {k.rsplit(".", 1)[0] for k in tensors}


# ----------------------------------------------------------------------------- import

def _matches(name: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return name == target or target == "Linear"   # a class name: every Linear is one


def _scheme_for(name: str, qc) -> object | None:
    if any(_matches(name, t) for t in (qc.ignore or [])):
        return None
    # compressed-tensors resolves several matches to the most specific target; exact names beat regexes beat
    # classes, which the order below gives
    found = [(0 if t == name else 1 if t.startswith("re:") else 2, s)
             for s in qc.config_groups.values() for t in s.targets if _matches(name, t)]
    return min(found, key=lambda x: x[0])[1] if found else None


def _pop(sd: dict, name: str, key: str, where: str) -> torch.Tensor:
    try:
        return sd.pop(f"{name}.{key}")
    except KeyError:
        raise LowbitError(f"{where}: module {name}: missing tensor {name}.{key}") from None


def _spec_of(w, name: str, where: str) -> QuantSpec:
    gs = {"channel": -1, "tensor": 0}.get(w.strategy, w.group_size)
    if w.strategy not in ("channel", "tensor", "group") or gs is None:
        raise LowbitError(f"{where}: module {name}: weight strategy {w.strategy!r} is not one lowbit reads "
                          f"(channel, group, tensor)")
    return QuantSpec(bits=w.num_bits, symmetric=bool(w.symmetric), group_size=int(gs))


def _import_weight_only(name: str, s, sd: dict, where: str, unpack_from_int32, packed: bool) -> WeightOnlyLinear:
    w = s.weights
    spec = _spec_of(w, name, where)
    half = 1 << (spec.bits - 1)
    scale = _pop(sd, name, "weight_scale", where)
    if packed:
        shape = [int(v) for v in _pop(sd, name, "weight_shape", where).tolist()]
        q = unpack_from_int32(_pop(sd, name, "weight_packed", where), spec.bits, torch.Size(shape))  # [out, in] int8
    else:  # naive / int-quantized 8-bit weight-only: int8 codes as they are
        q = _pop(sd, name, "weight", where)
        shape = list(q.shape)
    out_f, in_f = shape
    rows_g = (1, 1) if spec.group_size == 0 else (out_f, scale.numel() // max(out_f, 1))
    zero = None
    if not spec.symmetric:
        z = _pop(sd, name, "weight_zero_point", where)
        if spec.group_size != 0 and packed and z.dtype == torch.int32:
            z = unpack_from_int32(z, spec.bits, torch.Size(rows_g), packed_dim=0)
        zero = (z.reshape(rows_g).to(torch.int16) + half).to(scale.dtype)
        q = (q.to(torch.int16) + half).to(torch.uint8)
    else:
        sd.pop(f"{name}.weight_zero_point", None)   # symmetric: all zeros when present
    g_idx = sd.pop(f"{name}.weight_g_idx", None)   # legacy actorder "group" checkpoints
    return WeightOnlyLinear.from_quantized(q, scale.reshape(rows_g), zero, spec, sd.pop(f"{name}.bias", None),
                                           g_idx=g_idx, dtype=scale.dtype)


def _import_w8a8(name: str, s, sd: dict, where: str):
    w, a = s.weights, s.input_activations
    is_fp8 = w.type == "float"
    if w.num_bits != 8 or not w.symmetric or w.strategy not in ("channel", "tensor") or (
            not is_fp8 and w.strategy != "channel"):
        raise LowbitError(f"{where}: module {name}: W8A8 weights must be 8-bit symmetric per channel"
                          f"{' or per tensor' if is_fp8 else ''}, got {w.num_bits}-bit {w.strategy}")
    if a.num_bits != 8 or a.type != w.type or not a.symmetric or a.strategy not in ("token", "tensor") or (
            a.strategy == "token" and not a.dynamic):
        raise LowbitError(f"{where}: module {name}: input activations must be symmetric 8-bit {w.type}, dynamic "
                          f"per token or per tensor, or static per tensor; got {a.model_dump()}")
    qw, ws = _pop(sd, name, "weight", where), _pop(sd, name, "weight_scale", where).float()
    act = None if a.dynamic else _pop(sd, name, "input_scale", where).float()
    sd.pop(f"{name}.input_zero_point", None)
    sd.pop(f"{name}.weight_zero_point", None)
    bias = sd.pop(f"{name}.bias", None)
    out_f, in_f = qw.shape
    kw = dict(static_act=act is not None, bias=bias is not None,
              dtype=bias.dtype if bias is not None else torch.float16)
    if is_fp8:
        layer = FP8Linear(in_f, out_f, per_channel=w.strategy == "channel",
                          per_token_act=a.strategy == "token" and bool(a.dynamic), **kw)
    else:
        if a.strategy == "tensor" and a.dynamic:
            raise LowbitError(f"{where}: module {name}: dynamic per-tensor int8 activations are not a lowbit "
                              f"layer (int8 is per token, or static per tensor)")
        layer = Int8Linear(in_f, out_f, **kw)
    layer._load("qweight", qw)
    layer._load("w_scale", ws)
    layer._load_optional(act_scale=act, bias=bias)
    return layer


def import_layers(quantization_config: dict, sd: dict[str, torch.Tensor], where: str) -> dict:
    """lowbit layers for every quantized Linear of a compressed-tensors checkpoint; pops their tensors."""
    QuantizationConfig, *_, unpack_from_int32 = _ct()
    qc_dict = {k: v for k, v in quantization_config.items()
               if k not in ("quant_method", "version", "sparsity_config", "transform_config")}
    try:
        qc = QuantizationConfig.model_validate(qc_dict)
    except Exception as e:  # pydantic's ValidationError: several lines; name the first field and its problem
        errs = e.errors() if hasattr(e, "errors") else []
        loc = [str(x) for x in errs[0]["loc"] if "[" not in str(x)] if errs else []   # drop validator names
        detail = (f"field {'.'.join(loc)}: {errs[0]['msg']}" if errs
                  else str(e).splitlines()[0])
        raise LowbitError(f"{where}: quantization_config is not a valid compressed-tensors config: {detail}") from None
    if quantization_config.get("sparsity_config") or quantization_config.get("transform_config"):
        raise LowbitError(f"{where}: sparsity_config / transform_config are not read by lowbit")
    modules = sorted({k.rsplit(".", 1)[0] for k in sd if k.endswith((".weight_packed", ".weight_scale"))})
    layers = {}
    for name in modules:
        s = _scheme_for(name, qc)
        if s is None or s.weights is None:
            raise LowbitError(f"{where}: tensor {name}.weight_scale belongs to no config group of the "
                              f"quantization_config (or to an ignored module)")
        w, fmt = s.weights, s.format or qc.format
        try:
            if w.type == "int" and s.input_activations is None:
                layers[name] = _import_weight_only(name, s, sd, where, unpack_from_int32,
                                                   packed=f"{name}.weight_packed" in sd)
            elif s.input_activations is not None and w.num_bits == 8:
                layers[name] = _import_w8a8(name, s, sd, where)
            else:
                raise LowbitError(f"scheme {s.model_dump()} (format {fmt}) is not one lowbit reads")
        except LowbitError as e:
            msg = str(e)
            raise LowbitError(msg if msg.startswith(where) else f"{where}: module {name}: {msg}") from None
    if qc.kv_cache_scheme is not None:
        raise LowbitError(f"{where}: kv_cache_scheme (static k/v scales) is not read by lowbit; lowbit quantizes "
                          f"the KV cache per token (--kv-cache int8|fp8)")
    return layers
