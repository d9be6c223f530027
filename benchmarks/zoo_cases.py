"""The zoo: models from transformers' auto registries (generically shrunken configs), timm and torchvision.

A case is "source:name[:task]"; `builder(case)` returns a zero-argument constructor, the same one for eager and
for every torchinit mode, so the only difference between runs is the mode. `cases(source)` lists them all.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

HF_TASKS = {  # task -> the auto class and its mapping name in transformers.models.auto.modeling_auto
    "causal": ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    "base": ("AutoModel", "MODEL_MAPPING_NAMES"),
    "masked": ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
    "image": ("AutoModelForImageClassification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"),
}
# Generic shrinking: every config attribute with one of these names is set to the small value (if it has it).
_SMALL = {
    "hidden_size": 64, "d_model": 64, "n_embd": 64, "dim": 64, "emb_dim": 64, "embed_dim": 64, "n_embed": 64,
    "num_hidden_layers": 2, "n_layer": 2, "n_layers": 2, "num_layers": 2, "encoder_layers": 2, "decoder_layers": 2,
    "num_encoder_layers": 2, "num_decoder_layers": 2,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "encoder_attention_heads": 4,
    "decoder_attention_heads": 4, "num_heads": 4,
    "num_key_value_heads": 2, "intermediate_size": 128, "ffn_dim": 128, "encoder_ffn_dim": 128,
    "decoder_ffn_dim": 128, "hidden_dim": 128, "n_inner": 128, "d_ff": 128, "moe_intermediate_size": 32,
    "vocab_size": 256, "max_position_embeddings": 128, "n_positions": 128, "head_dim": 16,
    "num_local_experts": 4, "num_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "image_size": 32, "patch_size": 8, "num_channels": 3, "hidden_sizes": [16, 32], "depths": [1, 1],
    "embed_dims": [16, 32],
}
TIMM = ["resnet18", "vit_tiny_patch16_224", "convnext_atto", "efficientnet_b0", "mobilenetv3_small_050",
        "regnetx_002", "regnety_002", "eva02_tiny_patch14_224", "hiera_tiny_224", "swin_tiny_patch4_window7_224",
        "deit_tiny_patch16_224", "levit_128s", "coatnet_nano_rw_224", "maxvit_nano_rw_256", "densenet121",
        "dla34", "ghostnet_100", "nfnet_l0", "cspresnet50", "beit_base_patch16_224", "fastvit_t8",
        "efficientformer_l1", "poolformer_s12", "mixer_b16_224", "edgenext_xx_small", "mobilevit_xxs"]
TORCHVISION = ["resnet18", "mobilenet_v3_small", "regnet_y_400mf", "regnet_y_3_2gf", "efficientnet_b0",
               "vit_b_32", "swin_t", "convnext_tiny", "densenet121", "squeezenet1_0", "shufflenet_v2_x0_5",
               "mnasnet0_5", "googlenet", "inception_v3", "maxvit_t", "detection.ssdlite320_mobilenet_v3_large",
               "detection.fasterrcnn_mobilenet_v3_large_fpn", "segmentation.lraspp_mobilenet_v3_large",
               "segmentation.deeplabv3_mobilenet_v3_large", "video.r3d_18", "video.mvit_v2_s"]


def cases(source: str) -> list[str]:
    """Every case of a source: "hf", "timm" or "tv"."""
    if source == "timm":
        return [f"timm:{n}" for n in TIMM]
    if source == "tv":
        return [f"tv:{n}" for n in TORCHVISION]
    auto = importlib.import_module("transformers.models.auto.modeling_auto")
    found = []
    for task, (_, mapping) in HF_TASKS.items():
        found += [f"hf:{name}:{task}" for name in sorted(getattr(auto, mapping))]
    return found


def shrink(config) -> object:
    """Set the size attributes `_SMALL` names, here and in sub-configs (text_config, vision_config, ...)."""
    for key, value in _SMALL.items():
        if key in vars(config) and type(getattr(config, key)) is type(value):
            if isinstance(value, list):
                value = (value * 4)[:len(getattr(config, key))] if getattr(config, key) else value
            try:
                setattr(config, key, value)
            except Exception:  # noqa: BLE001 (a validated attribute that refuses the value: keep it)
                pass
    ids = [v for k, v in vars(config).items() if k.endswith("token_id") and isinstance(v, int)]
    if ids and isinstance(vars(config).get("vocab_size"), int):
        config.vocab_size = max(config.vocab_size, max(ids) + 1)
    for key in ("layer_types", "mlp_layer_types"):
        if isinstance(vars(config).get(key), list):
            setattr(config, key, vars(config)[key][: getattr(config, "num_hidden_layers", 2)])
    for value in list(vars(config).values()):
        if hasattr(value, "to_dict") and hasattr(value, "model_type") and value is not config:
            shrink(value)
    return config


def builder(case: str) -> Callable[[], object]:
    """A zero-argument constructor for `case` (config made once, outside any init context)."""
    source, name, *rest = case.split(":")
    if source == "hf":
        import transformers

        config = shrink(transformers.AutoConfig.for_model(name))
        auto = getattr(transformers, HF_TASKS[rest[0]][0])
        return lambda: auto.from_config(config)
    if source == "timm":
        import timm

        return lambda: timm.create_model(name, pretrained=False)
    if source == "tv":
        import torchvision.models as tvm

        *package, fn = name.split(".")
        module = importlib.import_module(".".join(["torchvision.models", *package])) if package else tvm
        kwargs = {"weights_backbone": None} if package and package[0] in ("detection", "segmentation") else {}
        return lambda: getattr(module, fn)(weights=None, **kwargs)
    raise ValueError(f"unknown source in case {case!r}: use hf:, timm: or tv:")


def importable(case: str) -> str | None:
    """None if the case's library imports here, else why not (the zoo test skips with this reason)."""
    module = {"hf": "transformers", "timm": "timm", "tv": "torchvision"}[case.split(":")[0]]
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 (torchvision's wheel raises OSError/RuntimeError beside a CPU torch)
        return f"{module} does not import here: {type(exc).__name__}: {str(exc)[:120]}"
    return None
