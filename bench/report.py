"""Turn bench/results/<gpu>/*.jsonl into bench/results/<gpu>/REPORT.md: the latest row per
(op, case, mode, provider), GB/s, roofline fraction and the speed-up of triton over eager and compile.

    python bench/report.py            # every GPU folder under bench/results
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _header(folder: Path, any_row: dict) -> list[str]:
    """Title, versions, timing, and the ceilings stored beside the rows: the session's measured copy bandwidth
    (bandwidth.json, written by every `pytest bench/` session) and the hw.json of bench/ceilings.py."""
    lines = [
        f"# Kernel benchmarks on {any_row['gpu']}",
        "",
        f"torch {any_row['torch']}, triton {any_row['triton']}, commit {any_row['git_sha']}, "
        f"{any_row['date_utc']} (latest row per case). Timing: triton.testing.do_bench, L2 flushed, p50.",
        "",
    ]
    bw = folder / "bandwidth.json"
    if bw.exists():
        b = json.loads(bw.read_text())
        nominal = "n/a" if b["nominal_gbps"] is None else f"{b['nominal_gbps']:.0f} GB/s"
        lines += [f"Roofline: a row's GB/s over the device-to-device copy bandwidth measured in its own session "
                  f"(the latest: {b['copy_gbps']:.0f} GB/s on {b['date_utc']}; spec sheet {nominal}).", ""]
    hw = folder / "hw.json"
    if hw.exists():
        c = json.loads(hw.read_text())
        lines += [f"Ceilings measured on this card ({c['date_utc']}, bench/ceilings.py): device-to-device copy "
                  f"{c['copy_gbps']:.0f} GB/s, bf16 8192^3 matmul {c['bf16_matmul_tflops']:.0f} TFLOP/s, "
                  f"{c['sm_count']} SMs, {c['memory_gib']:.0f} GiB.", ""]
    return lines


NOT_KERNELS = ("model", "train_step", "sampling", "inception", "integrations", "data")
"""Ops with their own tables below; every other op is a kernel."""


def _kernel_table(latest: dict) -> list[str]:
    """The kernel rows: triton vs eager vs torch.compile, GB/s and roofline."""
    if not any(k[0] not in NOT_KERNELS for k in latest):
        return []
    lines: list[str] = []
    lines += [
        "| op | case | mode | triton ms | eager ms | compile ms | triton GB/s | roofline | vs eager | vs compile |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for op, case, mode in sorted({k[:3] for k in latest if k[0] not in NOT_KERNELS}):
        rows = {p: latest.get((op, case, mode, p)) for p in ("triton", "eager", "compile")}
        ms = {p: (r["ms"][0] if r else float("nan")) for p, r in rows.items()}
        t = rows["triton"]
        lines.append(
            f"| {op} | {case} | {mode} | {ms['triton']:.4f} | {ms['eager']:.4f} | {ms['compile']:.4f} | "
            f"{t['gbps'] if t else float('nan'):.0f} | {t['roofline'] if t else float('nan'):.0%} | "
            f"{ms['eager'] / ms['triton']:.2f}x | {ms['compile'] / ms['triton']:.2f}x |"
        )
    return lines


def _model_table(latest: dict) -> list[str]:
    """Whole-model rows (bench/bench_models.py)."""
    lines: list[str] = []
    models = sorted({k[1:3] for k in latest if k[0] == "model"})
    if models:
        providers = ("fused", "fused_compile", "eager", "compile", "original", "original_compile")
        lines += ["", "## Whole models (bf16 autocast; TFLOP/s from FLOPs counted on meta; MFU vs the GPU's bf16 peak)",
                  "",
                  "Providers: ours fused (Triton kernels), fused+compile, ours eager, torch.compile of eager, and for",
                  "the loss pass the original SiT (a transcription with its per-sample REPA loop), eager and compiled.",
                  "",
                  "| case | mode | " + " | ".join(f"{p} ms" for p in providers) + " | fused TFLOP/s | fused MFU | "
                  "vs eager | vs compile | vs original compiled |",
                  "|" + "---|" * (len(providers) + 7)]
        for case, mode in models:
            rows = {p: latest.get(("model", case, mode, p)) for p in providers}
            ms = {p: (r["ms"][0] if r else float("nan")) for p, r in rows.items()}
            best = rows["fused"] or rows["eager"] or next(r for r in rows.values() if r)
            ref = ms["fused"] if rows["fused"] else ms["eager"]
            lines.append(f"| {case} | {mode} | " + " | ".join(f"{ms[p]:.3f}" for p in providers) +
                         f" | {best['tflops']:.0f} | {best['mfu']:.0%} | {ms['eager'] / ref:.2f}x | "
                         f"{ms['compile'] / ref:.2f}x | {ms['original_compile'] / ref:.2f}x |")
    return lines


def _integration_table(latest: dict) -> list[str]:
    """Patched foreign models (bench/bench_integrations.py)."""
    lines: list[str] = []
    integrations = sorted({k[1:3] for k in latest if k[0] == "integrations"})
    if integrations:
        providers = ("eager", "patched", "compile", "patched_compile")
        lines += ["", "## Patched foreign models (repae.kernels.integrations.patch; bench/bench_integrations.py)", "",
                  "bf16 autocast, fp32 weights, train mode. compile: every transformer block compiled (regional), the",
                  "embedders and the final norm eager. TFLOP/s from FLOPs counted on the unpatched model.", "",
                  "| case | mode | " + " | ".join(f"{p} ms" for p in providers) + " | patched vs eager | "
                  "patched_compile vs compile | patched TFLOP/s | peak GiB eager / patched |",
                  "|" + "---|" * (len(providers) + 6)]
        for case, mode in integrations:
            rows = {p: latest.get(("integrations", case, mode, p)) for p in providers}
            ms = {p: (r["ms"][0] if r else float("nan")) for p, r in rows.items()}
            mem = {p: (r["peak_mem_gib"] if r else float("nan")) for p, r in rows.items()}
            tf = rows["patched"]["tflops"] if rows["patched"] else float("nan")
            lines.append(f"| {case} | {mode} | " + " | ".join(f"{ms[p]:.2f}" for p in providers) +
                         f" | {ms['eager'] / ms['patched']:.2f}x | {ms['compile'] / ms['patched_compile']:.2f}x | "
                         f"{tf:.0f} | {mem['eager']:.1f} / {mem['patched']:.1f} |")
    return lines


def _train_step_table(latest: dict) -> list[str]:
    """The REPA-E train step rows (bench/bench_train_step.py): one line per row, then each phase measured / floor."""
    steps = [r for k, r in sorted(latest.items()) if k[0] == "train_step"]
    if not steps:
        return []
    lines = ["", "## The REPA-E train step (one GPU, 10 burn-in + 20 timed steps)", "",
             "Floor: the run planner's roofline time per phase on the spec sheet of the GPU named (repae.plan, no",
             "communication); x floor = measured / floor. Rows older than the floor show '-'.", "",
             "| case | kernels | engines | ms/step | img/s | peak GiB | floor on | floor ms | x floor |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in steps:
        floor = r.get("floor_ms")  # None in rows older than the floor, and on a GPU GPU_SPECS lacks
        floor_cols = f"{floor:.1f} | {r['ms'][0] / floor:.2f}" if floor else "- | -"
        lines.append(f"| {r['case']} | {r['provider']} | {r['engines']} | {r['ms'][0]:.1f} | {r['img_per_s']:.1f} | "
                     f"{r['peak_mem_gib']:.1f} | {r.get('floor_gpu') or '-'} | {floor_cols} |")
    notes = [f"{r['provider']} {r['case']}: no floor, {r['floor_note']}." for r in steps if r.get("floor_note")]
    return lines + [""] + notes + [""] * bool(notes) + _phase_table(steps)


def _phase_table(steps: list[dict]) -> list[str]:
    """Phases down, one column per train-step row, each cell `measured / floor (x)` in ms; '-' for what a row lacks."""
    # Phase names in the order the rows give them; a dict keeps the first place of each.
    phases = dict.fromkeys(p for r in steps for p in (*r["split_ms"], *(r.get("predicted_ms") or {})))
    lines = ["| phase | " + " | ".join(f"{r['provider']} {r['case']}: measured / floor ms" for r in steps) + " |",
             "|---|" + "---|" * len(steps)]
    for phase in phases:
        cells = []
        for r in steps:
            measured, floor = r["split_ms"].get(phase), (r.get("predicted_ms") or {}).get(phase)
            cell = "-" if measured is None else f"{measured:.1f}"
            cell += " / -" if floor is None else f" / {floor:.1f}"
            cells.append(cell + (f" ({measured / floor:.1f}x)" if measured is not None and floor else ""))
        lines.append(f"| {phase} | " + " | ".join(cells) + " |")
    return lines


def _sampling_table(latest: dict) -> list[str]:
    """Sampling and Inception rows (bench/bench_sampling.py)."""
    lines: list[str] = []
    sampling = [r for k, r in sorted(latest.items()) if k[0] in ("sampling", "inception")]
    if sampling:
        lines += ["", "## Sampling and evaluation (images/s per batch; bench/bench_sampling.py)", "",
                  "Sampling rows are composed from measured parts: ms = n_in * step_in + n_out * step_out + decode",
                  "(p50s; steps inside / outside the guidance interval on the sampler's own grid).", "",
                  "| op | case | mode | provider | precision | img/s | ms/batch | n_in / n_out | step in ms | "
                  "step out ms | decode ms |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sampling:
            parts = (f"{r['n_in']} / {r['n_out']} | {r['step_in_ms'][0]:.1f} | {r['step_out_ms'][0]:.1f} | "
                     f"{r['decode_ms'][0]:.1f}" if r.get("composed") else "- | - | - | -")
            lines.append(f"| {r['op']} | {r['case']} | {r['mode']} | {r['provider']} | {r['precision']} | "
                         f"{r['img_per_s']:.2f} | {r['ms'][0]:.1f} | {parts} |")
    return lines


def _data_table(latest: dict) -> list[str]:
    """Data-source rows (bench/bench_data.py): images/s per source."""
    rows = [r for k, r in sorted(latest.items()) if k[0] == "data"]
    if not rows:
        return []
    lines = ["", "## Data sources (images/s; bench/bench_data.py)", "", "| case | source | mode | workers | img/s |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['provider']} | {r['mode']} | {r.get('workers', '-')} | {r['img_per_s']:.0f} |"
              for r in rows]
    return lines


def report(folder: Path) -> str:
    latest: dict[tuple, dict] = {}
    for path in sorted(folder.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            latest[(row["op"], row["case"], row["mode"], row["provider"])] = row
    if not latest:
        return ""
    lines = _header(folder, next(iter(latest.values())))
    for table in (_kernel_table, _model_table, _integration_table, _train_step_table, _sampling_table,
                  _data_table):
        lines += table(latest)
    return "\n".join(lines) + "\n"


def main() -> int:
    written = 0
    for folder in sorted(p for p in RESULTS.iterdir() if p.is_dir()) if RESULTS.exists() else []:
        text = report(folder)
        if text:
            (folder / "REPORT.md").write_text(text)
            print(text)
            written += 1
    if not written:
        print(f"no benchmark rows under {RESULTS} (run `pytest bench/` on a GPU first)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
