"""The context-extension methods of the reproduction, each as a list of training stages.

A method turns (pretrained length L, scale s, head dim, head count) into stages; a stage is what one
`megatron-ext train` run needs on top of the shared settings: its sequence length, its RoPE, its PoSE
settings and its share of the extension token budget. The method names are the rows of the report.

Bases for a model other than the one a paper used are carried over with one rule, `transfer_base`:
keep the slowest RoPE wavelength, as a multiple of the target length, what the paper had. A rotary
pair i of a head with dimension d turns with wavelength 2*pi * b^(2i/d); the slowest pair (i = d/2 - 1)
has 2*pi * b^((d-2)/d). Solving for b at another head dimension and target gives the new base.
"""

import math
from dataclasses import dataclass, field

# The published settings the rule starts from: (base, head dim, target length).
ABF_REFERENCE = (500_000.0, 128, 32_768)  # Xiong et al. 2023 (Llama 2 Long): base 5e5 for 32k, Llama-2 heads
HARPE_REFERENCE_RANGE = (1_000_000.0, 5_000_000.0)  # HARPE (arXiv 2412.07171): b_min, b_max for Llama-2-7B
HARPE_REFERENCE_TARGET = (128, 131_072)  # ... its head dim and 128k target
HARPE_REFERENCE_STEP = 30_000.0  # ... and its peak-valley search stride (134 candidates)


def slowest_wavelength(base: float, head_dim: int) -> float:
    """Tokens per turn of the slowest rotary pair of a head with `head_dim` channels."""
    return 2 * math.pi * base ** ((head_dim - 2) / head_dim)


def transfer_base(reference: tuple[float, int, int], head_dim: int, target: int) -> float:
    """The base giving `head_dim`-channel heads at `target` tokens the reference's wavelength/target ratio."""
    base, reference_dim, reference_target = reference
    wavelength = slowest_wavelength(base, reference_dim) * target / reference_target
    return (wavelength / (2 * math.pi)) ** (head_dim / (head_dim - 2))


@dataclass
class Stage:
    """One training run of a method's extension."""

    seq_length: int
    rope: dict = field(default_factory=dict)  # RopeConfig fields on top of the pretrained model's
    pose: dict = field(default_factory=dict)  # PoseConfig fields; empty: PoSE off
    budget_share: float = 1.0  # of the extension token budget
    label: str = ""


@dataclass
class Method:
    name: str
    description: str
    stages: list[Stage]  # empty: evaluate the pretrained model as it is


def harpe_range(head_dim: int, target: int) -> tuple[float, float]:
    """(b_min, b_max) of HARPE's Llama-2 range carried to `head_dim` heads and `target` tokens."""
    reference_dim, reference_target = HARPE_REFERENCE_TARGET
    return tuple(transfer_base((b, reference_dim, reference_target), head_dim, target) for b in HARPE_REFERENCE_RANGE)


def build_methods(*, base_length: int, scale: int, head_dim: int, base: float = 10_000.0) -> dict[str, Method]:
    """Every method of the reproduction, by name, in report order."""
    target = base_length * scale
    b_min, b_max = harpe_range(head_dim, target)
    reference_low, reference_high = HARPE_REFERENCE_RANGE
    # the paper's stride as a share of its range, so the search weighs as many candidates
    step = (b_max - b_min) * HARPE_REFERENCE_STEP / (reference_high - reference_low)
    uniform = dict(head_base_strategy="uniform", head_base_params=dict(b_min=b_min, b_max=b_max, order="ascending"))
    # the search looks at distances up to the target at the default's resolution (128k: every 32nd, windows of 2k)
    peak_valley = dict(head_base_strategy="peak_valley", head_base_params=dict(
        b_min=b_min, b_max=b_max, step=step, head_dim=head_dim, max_distance=target,
        distance_step=max(1, target // 4096), peak_window=max(2 * max(1, target // 4096), target // 64)))
    linear = dict(scaling="linear", scaling_params=dict(factor=float(scale)))
    yarn = dict(scaling="yarn", scaling_params=dict(factor=float(scale), original_max_position_embeddings=base_length))
    yarn_pose = dict(scaling="yarn_pose",
                     scaling_params=dict(factor=float(scale), original_max_position_embeddings=base_length))
    abf_base = transfer_base(ABF_REFERENCE, head_dim, target)
    pose = dict(enabled=True, target_length=target)

    def full(rope, label=""):
        return [Stage(seq_length=target, rope=rope, label=label)]

    def windowed(rope, label=""):
        return [Stage(seq_length=base_length, rope=rope, pose=pose, label=label)]

    ladder = [s for s in (2, 4, 8, 16, 32, 64) if s <= scale]
    if ladder[-1] != scale:
        ladder.append(scale)
    abf_multi = [Stage(seq_length=base_length * s, rope=dict(base=transfer_base(ABF_REFERENCE, head_dim,
                                                                                  base_length * s)),
                       budget_share=1 / len(ladder), label=f"{s}x") for s in ladder]
    methods = [
        Method("original", f"the pretrained model at {base_length}, no extension (the floor)", []),
        Method("vanilla", f"fine-tune at {target} with the pretrained RoPE (base {base:g})", full({})),
        Method("pi", f"position interpolation, linear factor {scale}", full(linear)),
        Method("ntk", f"NTK-aware base, factor {scale} (base {base:g} -> "
                      f"{base * scale ** (head_dim / (head_dim - 2)):.0f})",
               full(dict(scaling="ntk", scaling_params=dict(factor=float(scale))))),
        Method("abf", f"adjusted base frequency, base {abf_base:.0f} (Llama 2 Long's 5e5 for 32k, carried over)",
               full(dict(base=abf_base))),
        Method("yarn", f"YaRN, factor {scale}, original length {base_length}", full(yarn)),
        Method("abf_multi", "ABF in " + " -> ".join(stage.label for stage in abf_multi) + " stages, bases "
               + ", ".join(f"{stage.rope['base']:.0f}" for stage in abf_multi) + ", budget split evenly", abf_multi),
        Method("pose", f"PoSE: window {base_length}, position ids up to {target}, pretrained RoPE", windowed({})),
        Method("pose_linear", f"PoSE with linear interpolation, factor {scale}", windowed(linear)),
        Method("pose_yarn", f"PoSE with the PoSE repository's YaRN, factor {scale}", windowed(yarn_pose)),
        Method("harpe_uniform", f"HARPE, uniform bases {b_min:.0f} .. {b_max:.0f} (Eq. 9), trained at {target}",
               full(uniform)),
        Method("harpe_peak_valley", f"HARPE, peak-valley search in {b_min:.0f} .. {b_max:.0f} (Algorithm 1)",
               full(peak_valley)),
        Method("harpe_pose", f"HARPE uniform bases + PoSE window {base_length}, ids up to {target}",
               windowed(uniform)),
    ]
    return {method.name: method for method in methods}
