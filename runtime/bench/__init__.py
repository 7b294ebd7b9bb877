"""`tgis bench`: workloads, the clients that send them (in-process engine, gRPC, OpenAI HTTP), report and gate.

One workload (`workload.py`) is turned into a fixed list of requests; one driver (`driver.py`) sends them at a fixed
concurrency or at seeded Poisson arrival times through a target's `send`; `report.py` turns the timings into
metrics and `gate.py` compares a report with a baseline.
"""

from runtime.bench.errors import BenchError
from runtime.bench.runner import bench_engine, bench_grpc
from runtime.bench.workload import Workload

__all__ = ["BenchError", "Workload", "bench_engine", "bench_grpc"]
