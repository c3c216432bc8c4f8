"""The benchmark: analytic FLOP counts, a small end-to-end run, and bad flags."""

import json
import re

import pytest

from uspsjax import bench

# Forward multiply-accumulates per sample, counted by hand from the layer shapes.
FC_MACS = 256 * 256 + 256 * 128 + 128 * 64 + 64 * 32 + 32 * 16 + 16 * 10
CNN_MACS = (14 * 14 * 3 * 3 * 1 * 32      # conv 32, 3x3 valid: 16 -> 14
            + 12 * 12 * 3 * 3 * 32 * 64   # conv 64: 14 -> 12, then pool to 6x6x64 = 2304
            + 2304 * 128 + 128 * 10)
LC_MACS = (254 * 3 * 1 * 256 + 252 * 3 * 256 * 128 + 250 * 3 * 128 * 64 + 248 * 3 * 64 * 32
           + 246 * 3 * 32 * 16           # L_out * k * C_in * F per layer
           + 246 * 16 * 10)              # flatten (3936) -> Dense 10


def test_flop_counts_match_the_layer_shapes():
    """XLA's count of the forward (`population.forward_flops`) is its products' FLOPs, from the
    layer shapes here, plus the elementwise work (biases, activations): under 1 % more."""
    assert 6 * FC_MACS == 655_296 and 6 * CNN_MACS == 18_041_088 and 6 * LC_MACS == 198_315_648
    for net, macs in (("fc", FC_MACS), ("cnn", CNN_MACS), ("lc", LC_MACS)):
        assert 6 * macs < bench.train_flops_per_sample(net) < 6 * macs * 1.01, net


def test_grouped_patch_flops_count_the_dense_patch_convolutions():
    # Per LC layer, the forward's one-hot convolution made dense: L_out * (3 C_in)^2 MACs.
    per_layer = [254 * 3 ** 2, 252 * 768 ** 2, 250 * 384 ** 2, 248 * 192 ** 2, 246 * 96 ** 2]
    assert bench.grouped_patch_flops_per_sample("lc") == 2 * sum(per_layer) == 393_822_684
    assert bench.grouped_patch_flops_per_sample("cnn") == 0


def test_row_bound_is_the_lower_one():
    peaks = {"matmul_flop_per_s": 300e9, "copy_bytes_per_s": 50e9}
    lc = 33_177_770
    traffic_steps = 50e9 / (bench.WEIGHT_PASSES * 4 * lc)
    small = bench.row_bound("lc", 16, lc, peaks, "cpu", "sliced-dots (L,B,C)")
    assert small["bound"] == "weight traffic"
    assert small["bound_member_samples_per_s"] == pytest.approx(16 * traffic_steps)
    large = bench.row_bound("lc", 1024, lc, peaks, "cpu", "sliced-dots (L,B,C)")
    assert large["bound"] == "matmul peak"
    flops = bench.train_flops_per_sample("lc")  # tested against the layer shapes above
    assert large["bound_member_samples_per_s"] == pytest.approx(300e9 / flops)
    ref = bench.row_bound("lc", 1024, lc, peaks, "cpu", "conv_general_dilated_local")
    assert ref["bound"] == "matmul peak + grouped patches"
    assert ref["bound_member_samples_per_s"] == pytest.approx(
        300e9 / (flops + bench.grouped_patch_flops_per_sample("lc")))
    # Where the grouped convolution runs natively, its patches cost no dense FLOPs.
    gpu = bench.row_bound("lc", 1024, lc, peaks, "gpu", "conv_general_dilated_local")
    assert gpu["bound"] == "matmul peak"


def test_quick_lc_run_records_its_lowering(tmp_path, shared_h5):
    out = tmp_path / "bench"
    argv = ["--quick", "--networks", "lc", "--batch-sizes", "16", "--populations", "1",
            "--lc-lowering", "reference", "--out", str(out), "--data", str(shared_h5)]
    assert bench.main(argv) == 0
    [row] = json.loads((out / "cpu.json").read_text())["rows"]
    assert (row["network"], row["batch_size"], row["population"]) == ("lc", 16, 1)
    assert row["member_samples_per_s"] > 0 and row["n_params"] == 33_177_770
    assert row["lc_lowering"] == "conv_general_dilated_local" and row["microbatch"] == 16
    # Which bound is lower depends on this machine's measured peaks; that the grouped patches
    # are counted, and that the lower bound is the one named, does not.
    peaks = json.loads((out / "cpu.json").read_text())["peaks"]
    assert row["compute_bound_member_samples_per_s"] == pytest.approx(
        peaks["matmul_flop_per_s"] / (bench.train_flops_per_sample("lc")
                                     + bench.grouped_patch_flops_per_sample("lc")))
    assert row["bound"] in ("matmul peak + grouped patches", "weight traffic")
    assert row["bound_member_samples_per_s"] == pytest.approx(min(
        row["compute_bound_member_samples_per_s"], 16 * row["bw_bound_member_steps_per_s"]))
    assert row["pct_bound"] == pytest.approx(
        100 * row["member_samples_per_s"] / row["bound_member_samples_per_s"])
    assert "LC layers ran as: conv_general_dilated_local." in (out / "cpu.md").read_text()


def test_quick_fc_run_writes_json_and_table(tmp_path, shared_h5, capsys):
    out = tmp_path / "bench"
    argv = ["--quick", "--networks", "fc", "--batch-sizes", "16", "--populations", "1,2",
            "--microbatch", "8", "--out", str(out), "--data", str(shared_h5)]
    assert bench.main(argv) == 0
    result = json.loads((out / "cpu.json").read_text())
    assert result["peaks"]["matmul_flop_per_s"] > 0 and result["peaks"]["copy_bytes_per_s"] > 0
    rows = result["rows"]
    assert [(r["network"], r["batch_size"], r["population"]) for r in rows] == [
        ("fc", 16, 1), ("fc", 16, 2)]
    for r in rows:
        assert r["member_samples_per_s"] > 0 and r["flop_per_s"] > 0
        assert r["flops_per_sample"] == bench.train_flops_per_sample("fc")
        assert r["n_params"] == 109_722
        assert r["bound"] in ("matmul peak", "weight traffic") and r["pct_bound"] > 0
        assert "lc_lowering" not in r and r["microbatch"] == 8
    assert rows[1]["vmap_speedup"] > 0
    assert {f["sweep"] for f in result["flop_floor"]} == {"init", "lr", "batch", "momentum"}
    assert all(f["seconds_at_peak"] > 0 for f in result["flop_floor"])
    assert any("sequential" in t["text"] for t in result["targets"])
    assert "| fc | 16 | 2 | 2 | 1 | 8 |" in (out / "cpu.md").read_text()
    assert "| fc | 16 | 2 |" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--batch-sizes", "0"], ["--populations", "two"],
                                  ["--networks", "rnn"], ["--dtype", "float16"]])
def test_bad_flag_exits_2(argv, capsys):
    assert bench.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err


def test_profile_lists_the_step_operations_with_their_sources(shared_h5, capsys):
    from uspsjax import profile
    argv = ["fc", "--batch-size", "16", "--population", "2", "--steps", "3", "--top", "5",
            "--data", str(shared_h5)]
    assert profile.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    step_ms, in_ops, busy, together = map(float, re.fullmatch(
        r"fc batch 16, 2 member\(s\): (\S+) ms per step \(traced\), (\S+) ms in XLA operations; "
        r"(\S+) ms with one or more running, (\S+) ms with two or more", out[0]).groups())
    # Operations running side by side: their sum exceeds the time any runs by at least the
    # time two or more do (to the printed rounding).
    assert 0 < busy <= step_ms and 0 <= together <= busy
    assert in_ops - busy >= together - 0.15
    rows = [line.split(" | ") for line in out[3:]]
    assert len(rows) == 5
    times = [float(r[0].lstrip("| ")) for r in rows]
    assert times == sorted(times, reverse=True) and times[0] > 0
    # Every listed operation is named in the compiled HLO, with its shape.
    assert all(r[3].startswith(("f32[", "s32[", "pred[", "(")) for r in rows)


def test_concurrency_counts_time_covered_once_and_overlaps():
    from uspsjax.profile import concurrency
    assert concurrency([]) == (0, 0)
    # 0-10 and 5-20 overlap on 5-10; 30-40 alone; 32-35 inside it.
    assert concurrency([(5, 20), (0, 10), (30, 40), (32, 35)]) == (30, 8)
    assert concurrency([(0, 10), (10, 20)]) == (20, 0)


def test_hlo_ops_reads_names_types_and_sources():
    from uspsjax.profile import hlo_ops
    text = ('  %dot.12 = f32[64,256]{1,0} dot(%a, %b), metadata={op_name="jit(f)/Dense_0/dot_general"'
            ' stack_frame_id=61}, backend_config={"fusion_config":{"kind":"__ynn_fusion"}}\n'
            '  ROOT %tuple.3 = (f32[2]{0}) tuple(%x)\n'
            '%fused_computation.6 (param_0: f32[4]) -> f32[4] {\n'
            '  ROOT %m = f32[4]{0} multiply(%p, %p), metadata={op_name="jit(f)/mul"}\n}\n'
            '  %ynn_fusion.6 = f32[4]{0} fusion(%x), kind=kCustom, calls=%fused_computation.6\n')
    assert hlo_ops(text) == {"dot.12": ("f32[64,256]{1,0}", "jit(f)/Dense_0/dot_general"),
                             "tuple.3": ("(f32[2]{0})", ""), "m": ("f32[4]{0}", "jit(f)/mul"),
                             "ynn_fusion.6": ("f32[4]{0}", "jit(f)/mul")}
