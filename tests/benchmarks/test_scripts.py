"""The benchmark entry points that need no training: gpu.sh's fail-fast and the results collector."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from collect import collect  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU: gpu.sh would really run")
def test_gpu_script_fails_fast_without_a_gpu(tmp_path):
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin",
                                                                          "PYTHON": sys.executable})
    assert out.returncode == 3
    assert "no CUDA GPU is visible" in out.stderr and "GPU_SH_SMOKE=1" in out.stderr
    assert not (tmp_path / "out" / "adapter_speed_gpu.json").exists()


def test_gpu_script_needs_an_output_dir():
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh")], capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "usage: benchmarks/gpu.sh OUT_DIR" in out.stderr


def test_collect_renders_what_exists_and_lists_what_does_not(tmp_path):
    results = ROOT / "benchmarks" / "results"
    shutil.copy(results / "ingest_speed.json", tmp_path)
    shutil.copy(results / "scoring_speed.json", tmp_path)
    for name in ("ingest_speed", "scoring_speed"):  # the second machine's files
        shutil.copy(results / f"{name}.json", tmp_path / f"{name}_zen5.json")
    (tmp_path / "quality.md").write_text("# Quality title\n\n## Test ROC-AUC\n\n| market | mtl-lora |\n|---|---:|\n| en | 0.950 |\n")
    text = collect(tmp_path, tmp_path / "RESULTS.md")
    assert (tmp_path / "RESULTS.md").read_text() == text
    ingest = json.loads((results / "ingest_speed.json").read_text())
    assert f"{ingest['results'][-1]['rows']:,}" in text  # the measured figure, not a placeholder
    assert "CrossEncoder.predict" in text
    assert "### Test ROC-AUC" in text and "| en | 0.950 |" in text and "Quality title" not in text
    not_run = text.split("## Not run", 1)[1]
    assert "adapter_speed.json" in not_run and "quality_gpu.md" in not_run
    assert "`ingest_speed.json`" not in not_run and "`ingest_speed_zen5.json`" not in not_run
    assert "## Scoring speed, short ads (MiniLM-L6), on an AMD EPYC (Zen 5" in text
    assert "`adapter_speed_real_zen5.json`" in not_run and "scoring_speed_zen5" not in not_run
    assert "`ingest_speed_zen3.json`" in not_run  # a third machine's file, not copied here


def test_scoring_table_names_the_floor_auto_is_held_to():
    """A run on a CPU without native bf16 holds `auto` to the fp32 floor and has no forced-bf16 row; files
    written before that (no ``floor_precision``) still render against bf16."""
    from scoring_speed import format_table

    bf16 = json.loads((ROOT / "benchmarks" / "results" / "scoring_speed.json").read_text())
    assert "local engine bf16" in format_table(bf16) and "bf16 GEMM sustained" in format_table(bf16)
    fp32 = json.loads(json.dumps(bf16))
    fp32["floor_precision"] = "fp32"
    del fp32["results"]["engine-bf16"]
    fp32["floor"]["gemm_gflop_s"] = {"fp32": 130.0}
    fp32["floor"]["floor_pairs_per_s"] = {"fp32": 512.5}
    auto = fp32["results"]["engine-auto"]
    auto["fp32_gemm_gflop_s_around"] = [128.0, 131.0]
    auto["sustained_fp32_floor_pairs_per_s"] = 510.0
    text = format_table(fp32)
    assert "local engine bf16" not in text and "bf16 GEMM" not in text
    assert "GEMM fp32 130 GFLOP/s → 512.5 pairs/s" in text
    assert "fp32 GEMM sustained 128 / 131 GFLOP/s" in text and "the *_of_fp32_floor ratios" in text


def test_quick_runs_never_write_into_results(tmp_path):
    from _env import QUICK_DIR, RESULTS, output_path

    assert output_path(None, "x.json", quick=False) == RESULTS / "x.json"
    assert output_path(None, "x.json", quick=True) == QUICK_DIR / "x.json"
    assert output_path(tmp_path / "q.json", "x.json", quick=True) == tmp_path / "q.json"
    for inside in (RESULTS / "x.json", RESULTS, RESULTS / "sub" / "quality"):
        with pytest.raises(SystemExit, match="never go there"):
            output_path(inside, "x.json", quick=True)



def _squad(n_articles: int = 3) -> dict:
    """A SQuAD-format file: articles of two paragraphs, one question each."""
    return {"data": [{"title": f"Article {a}", "paragraphs": [
        {"context": f"Paragraph {p} of article {a} tells about river number {a * 2 + p} and its bridges.",
         "qas": [{"id": f"q{a}-{p}", "question": f"Which river does paragraph {p} of article {a} name?"}]}
        for p in range(2)]} for a in range(n_articles)]}


def test_gpu_speed_times_every_contender_and_its_floor_on_a_random_architecture(tmp_path):
    from relevance.model.tiny import build_tiny_model

    arch, xquad = build_tiny_model(tmp_path / "arch"), tmp_path / "xquad"
    xquad.mkdir()
    for market in ("de", "en"):
        (xquad / f"xquad.{market}.json").write_text(json.dumps(_squad()))
    out = tmp_path / "gpu_speed.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_speed.py"), "--quick", "--device", "cpu",
                          "--arch", str(arch), "--xquad", str(xquad), "--out", str(out)],
                         capture_output=True, text=True, timeout=300, env={**os.environ,
                                                                           "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["mode"] == "quick" and "random weights" in report["what"]
    assert {r["contender"] for r in report["results"]} == {"crossencoder", "engine-fp32", "engine-bf16"}
    assert all(r["pairs"] == 64 and r["pairs_per_s"] > 0 and r["of_floor"] > 0 for r in report["results"])
    assert 0 < report["mean_tokens"] <= 128 and report["floor_pairs_per_s"]["fp32"] > 0
    assert -1 <= report["bf16_vs_fp32_pearson_random_weights"] <= 1


def test_gpu_speed_script_fails_fast_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: gpu_speed.sh would really run")
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_speed.sh"), "a", "x", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin",
                                                                          "PYTHON": sys.executable})
    assert out.returncode == 3 and "GPU_SPEED_SMOKE=1" in out.stderr


def test_gpu_speed_names_the_xquad_file_it_lacks(tmp_path):
    from gpu_speed import long_pairs

    with pytest.raises(SystemExit, match=r"lacks .*xquad\.de\.json.*--markets"):
        long_pairs(tmp_path, ["de"], 10)


def test_results_name_the_cpu_and_its_bf16_instructions(tmp_path):
    from _env import cpu_model

    def info(flags: str) -> Path:
        path = tmp_path / f"cpuinfo-{len(flags)}"
        path.write_text(f"processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu sse2 {flags}\n\n")
        return path

    assert cpu_model(info("avx512f avx512_bf16 amx_tile amx_bf16")) == "Intel(R) Xeon(R) Processor (amx_bf16, avx512_bf16)"
    assert cpu_model(info("avx512f avx512_bf16")) == "Intel(R) Xeon(R) Processor (avx512_bf16)"
    assert cpu_model(info("avx2")) == "Intel(R) Xeon(R) Processor (no native bf16)"
