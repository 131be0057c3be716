"""What the benchmarks share: device/dtype options and case selection."""

import argparse

import torch


def add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: fp32 on CPU, bf16 on GPU")
    p.add_argument("--cases", nargs="*", help="case labels to run (default: all for the device)")


def resolve(a: argparse.Namespace, cpu_cases: list, gpu_cases: list):
    """(device, dtype, cases, batch index) for the parsed arguments; each case ends with (cpu batch, gpu batch)."""
    device = torch.device(a.device)
    gpu = device.type == "cuda"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype or ("bf16" if gpu else "fp32")]
    if gpu:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cases = gpu_cases if gpu else cpu_cases
    if a.cases:
        cases = [c for c in cases if c[0] in a.cases]
    return device, dtype, [(*c[:-2], c[-1] if gpu else c[-2]) for c in cases]


def save_partial(result: dict, out) -> None:
    """The rows so far, marked partial, written atomically after each row: a run stopped at its time limit
    (bench/run_all.py --timeout, a lent GPU's minutes) still leaves what it measured."""
    import json

    if out:
        from eval.atomic import write_text_atomic

        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out, json.dumps({**result, "partial": True}, indent=2) + "\n")


def write_result(result: dict, out) -> None:
    """Print the result as JSON and, with --out, write it there too, atomically: a run stopped at its time
    limit (or a full disk) while writing it leaves the rows saved before, which run_all reads, not half a file."""
    import json

    print(json.dumps(result, indent=2))
    if out:
        from eval.atomic import write_text_atomic

        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out, json.dumps(result, indent=2) + "\n")
