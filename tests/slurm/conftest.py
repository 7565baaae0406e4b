"""A throw-away Slurm cluster for the tests in this folder: two logical nodes (n1, n2) on this
host, started once per session and stopped (only the daemons it started) at the end.

It starts whenever the machine lets it: as root, with Debian's slurmctld/slurmd/slurm-client/munge
installed or installable through apt. Otherwise the tests skip and say why."""
from __future__ import annotations

import shutil

import pytest

from slurm_cluster import LocalSlurm, Unavailable


@pytest.fixture(scope="session")
def slurm_cluster():
    cluster = LocalSlurm(nodes=2, cpus=2)
    try:
        cluster.start()
    except Unavailable as e:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)
        pytest.skip(f"cannot start a local Slurm cluster: {e}")
    except BaseException:
        logs = cluster.logs()
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)
        print(logs)
        raise
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)
