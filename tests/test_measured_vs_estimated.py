"""benchmarks.measured_vs_estimated: the speed-of-light bound of a benchmark case, against its measured time."""

from fastres.benchmarks.measured_vs_estimated import markdown, rows


def _case(name, median, nbytes, flops=0, dtype="bfloat16", chosen=None):
    info = {"nbytes": nbytes, "flops": flops}
    if chosen:
        info["chosen"] = chosen
    return {"name": name, "params": {"dtype": dtype}, "stats": {"median": median}, "extra_info": info}


def test_bound_is_the_larger_of_bytes_and_flops_at_the_chips_peaks():
    results = {"machine_info": {"device_name": "NVIDIA H200"}, "benchmarks": [
        _case("memory", 2e-6, nbytes=4.8e6),  # 1 us at 4.8 TB/s
        _case("conv", 4e-6, nbytes=4.8e6, flops=2 * 990e6, chosen={"forward": ["unfused"]}),  # 2 us at 990 TFLOP/s
        _case("no bytes", 1e-6, nbytes=0),
    ]}
    table = rows(results)
    assert [r["name"] for r in table] == ["memory", "conv"]
    memory, conv = table
    assert memory["chip"] == "H200" and abs(memory["bound_us"] - 1.0) < 1e-9 and memory["limit"] == "DRAM"
    assert abs(memory["share_of_light"] - 0.5) < 1e-9
    assert abs(conv["bound_us"] - 2.0) < 1e-9 and conv["limit"] == "MMA"
    assert "forward: ['unfused']" in markdown(table)


def test_h100_bandwidth_by_default():
    table = rows({"machine_info": {"device_name": "NVIDIA H100 80GB HBM3"},
                  "benchmarks": [_case("m", 1e-6, nbytes=3.35e6)]})
    assert table[0]["chip"] == "H100 SXM" and abs(table[0]["bound_us"] - 1.0) < 1e-9
