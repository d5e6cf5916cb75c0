"""Extraction on a Ray cluster: an actor pool over the store's part ranges.

The driver (the process running ``tlfx extract --engine ray``) loads the dataset's item list, starts ``N`` actors,
takes the store's lock, writes the header, hands out blocks of ``part_size`` items and finally joins the parts with
``finalize(virtual=True)``: ``F.h5`` then holds HDF5 virtual datasets over ``F.h5.parts/part-*.h5`` and reads as one
file. Each actor loads the backbone once (``create_backbone`` + ``FeatureComputer``), decodes and embeds its block,
and writes the block's part itself with :func:`tlfx.store.write_part` (atomic rename of a whole block), so every
node needs the output directory and the images at the same path: a shared filesystem.

Why an actor pool and not Ray Data's ``map_batches``: the unit of work, of durability and of retry is the store's
part (a block of items), which must be written whole by the process that computed it and redone whole if that
process dies. A pool of actors over block ranges maps onto that 1:1; the driver knows which block each actor holds,
so a dead actor's blocks are re-queued exactly (Ray restarts the actor and retries its in-flight calls, and the
driver re-queues what still fails) and resume is "do the blocks with no part file". Decoding stays inside the actor
(``--workers`` decoding processes per actor), as in the local engine, so bad-image skips are recorded identically.

Failure semantics: a retried block rewrites the same part name by atomic rename, so a block is never counted twice;
a killed actor leaves at most a ``*.tmp<pid>`` file, which the driver removes before joining.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import math
import os
import socket
import sys
import time
from collections import deque

import numpy as np
import ray
from ray.exceptions import NodeDiedError, ObjectLostError, RayActorError, RayTaskError, WorkerCrashedError

from ..config import ExtractOptions
from ..datasets import ImageDataset, load_dataset
from ..errors import TlfxError
from ..extraction import ExtractResult, store_attributes
from ..safetext import terminal
from ..store import FeatureStore, StoreWriter, parts_dir, read_attrs, write_part
from . import connect_ray

IN_FLIGHT_PER_ACTOR = 2  # one block running, one queued: the actor never waits on the driver
# HDF5 keeps every source file of a virtual dataset open while reading it, and silently returns the fill value
# (NaN here) for sources it cannot open: with the common soft limit of 1024 open files, a store of more than ~1000
# parts reads wrong. Default part sizes therefore keep a store under MAX_PARTS parts (docs/scaling.md).
MAX_PARTS = 500
MAX_BLOCK_LOSSES = 3  # a block that took this many workers down with it (out of memory?) stops the run
START_GRACE_S = 120.0  # after the first worker is up, how long the others may take to find room on the cluster
_LOST = (RayActorError, WorkerCrashedError, NodeDiedError, ObjectLostError)
_FORWARDED_ENV = ("TLFX_PLUGINS_DIR", "TORCH_HOME", "HF_HOME", "TLFX_DEBUG", "HDF5_USE_FILE_LOCKING")


def items_digest(ds: ImageDataset) -> str:
    """Cheap identity of a dataset's item list (ids and labels), to check every actor sees the driver's items."""
    h = hashlib.sha256()
    h.update("\n".join(ds.ids).encode())
    h.update(np.ascontiguousarray(ds.labels, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


class BlockWorker:
    """A Ray actor: one backbone on one device, turning blocks ``[start, end)`` of the dataset into store parts."""

    def __init__(self, job: dict, ds: ImageDataset | None = None):
        self.job = job
        self.error = None
        try:
            self._setup(job, ds)
        except Exception as exc:  # reported by describe(): the driver prints one line instead of a Ray traceback
            self.error = str(getattr(exc, "message", None) or exc) if isinstance(exc, TlfxError) else \
                f"{type(exc).__name__}: {exc}"

    def _setup(self, job, ds):
        import torch

        from ..backbone import create_backbone
        from ..extraction import FeatureComputer

        if os.path.isdir(job["cwd"]):
            os.chdir(job["cwd"])  # relative data specs and weights paths mean what they meant on the driver
        ctx = ray.get_runtime_context()
        cpus = ctx.get_assigned_resources().get("CPU") or 1
        torch.set_num_threads(max(1, int(cpus) - int(job["workers"])) if job["workers"] else max(1, int(cpus)))
        if ds is None:
            ds = load_dataset(job["data"], split=job["split"], root=job["root"], limit=job["limit"])
        self.ds = ds
        bb = create_backbone(job["backbone"], job["weights"])
        self.computer = FeatureComputer(bb, job["layers"], job["pooling"], job["image_size"], job["precision"],
                                        job["device"], job["compile"], tta=job.get("tta") or "none")
        self.info = {
            "config": {**bb.config(self.computer.layers, job["pooling"], job["image_size"]), "tta": self.computer.tta},
            "precision": self.computer.precision,
            "device": str(self.computer.device),
            "n_items": len(ds),
            "digest": items_digest(ds),
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }

    @ray.method(max_task_retries=0)  # a probe of a dead actor must fail at once, not be retried
    def describe(self) -> dict:
        if self.error:
            return {"error": self.error, "host": socket.gethostname(), "pid": os.getpid()}
        return {**self.info, "pid": os.getpid()}

    def run_block(self, start: int, end: int) -> dict:
        """Decode, embed and write items ``[start, end)`` as one part; returns what it did."""
        if self.error:
            raise TlfxError(self.error)
        t0 = time.perf_counter()
        job, ds = self.job, self.ds
        feats, good_idx, skipped, dim = [], [], [], 0
        for _idx, good, arr, bad in self.computer.loader(ds, range(start, end), job["batch_size"], job["workers"]):
            if bad and job["strict"]:
                i, reason = bad[0]
                raise TlfxError(f"cannot read '{terminal(ds.ids[i])}': {terminal(reason)} (--strict); fix or "
                                f"remove it, then run again to resume")
            skipped += bad
            if arr is not None:
                f = self.computer(arr)
                dim = f.shape[1]
                feats.append(f)
                good_idx += good
        features = np.concatenate(feats) if feats else np.zeros((0, dim), np.float32)
        # what listing could not use goes into the part that starts at item 0, as the local engine does
        listed = list(getattr(ds, "listing_skips", None) or []) if start == 0 else []
        write_part(job["out"], start, end, features, ds.labels[good_idx], [ds.ids[i] for i in good_idx],
                   listed + [(ds.ids[i], r) for i, r in skipped], job["dtype"])
        return {"start": start, "end": end, "rows": len(good_idx), "skipped": len(skipped), "dim": dim,
                "pid": os.getpid(), "host": socket.gethostname(), "seconds": time.perf_counter() - t0}


def default_part_size(n_items: int, batch_size: int = 64) -> int:
    """The local engine's ~2048 items per part, made bigger (whole batches) when that would exceed MAX_PARTS parts."""
    size = max(batch_size, (2048 // batch_size) * batch_size)
    if math.ceil(n_items / size) > MAX_PARTS:
        size = math.ceil(n_items / MAX_PARTS / batch_size) * batch_size
    return size


def missing_blocks(parts, n_items: int, block: int) -> list[tuple[int, int]]:
    """Blocks of at most ``block`` items covering every item no part covers (works whatever wrote the parts)."""
    gaps, k = [], 0
    for start, end, _ in sorted(parts):
        if start > k:
            gaps.append((k, min(start, n_items)))
        k = max(k, end)
    if k < n_items:
        gaps.append((k, n_items))
    return [(s, min(s + block, e)) for a, e in gaps for s in range(a, e, block)]


def _remove_temporaries(path: str):
    for tmp in glob.glob(os.path.join(glob.escape(parts_dir(path)), "part-*.h5.tmp*")):
        try:
            os.unlink(tmp)
        except OSError:
            pass


def _wait_for_actors(actors, cpus, gpus, grace: float | None = None):
    """Wait until the first actor is up (saying so every minute), then ``grace`` seconds for the others; actors
    that still find no room on the cluster are dropped, so a too-large ``--num-workers`` slows a run, never hangs it."""
    grace = START_GRACE_S if grace is None else grace
    pending = {a.describe.remote(): a for a in actors}
    ready: dict = {}
    waited = 0.0
    while pending and not ready:
        done, _ = ray.wait(list(pending), num_returns=1, timeout=60)
        if not done:
            waited += 60
            sys.stderr.write(f"waiting for the Ray cluster to fit a worker ({cpus} CPU, {gpus:g} GPU) for "
                             f"{waited:.0f} s; see 'ray status'\n")
        for ref in done:
            ready[ref] = pending.pop(ref)
    if pending:
        done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=grace)
        for ref in done:
            ready[ref] = pending.pop(ref)
    if pending:
        sys.stderr.write(f"warning: the Ray cluster fits only {len(ready)} of {len(actors)} workers; "
                         f"going on with {len(ready)}\n")
        for a in pending.values():
            ray.kill(a, no_restart=True)
    refs = list(ready)
    return [ready[r] for r in refs], ray.get(refs)


def _cluster_capacity(gpus_per_worker: float, cpus_per_worker: int) -> int:
    res = ray.cluster_resources()
    if gpus_per_worker > 0:
        gpus = res.get("GPU", 0)
        if gpus < gpus_per_worker:
            raise TlfxError(f"--gpus-per-worker {gpus_per_worker:g} but the Ray cluster has {gpus:g} GPUs; "
                            f"use --gpus-per-worker 0 for CPU workers")
        return int(gpus // gpus_per_worker)
    return max(1, int(res.get("CPU", 1) // cpus_per_worker))


def extract_ray(backbone: str = "efficientnet_lite0", data: str | ImageDataset = "digits", out: str = "features.h5", *,
                address: str | None = None, num_workers: int | None = None, gpus_per_worker: float = 0.0,
                max_restarts: int = 3, on_block=None, **options) -> ExtractResult:
    """:func:`tlfx.extract` on a Ray cluster; the same store, attributes, resume and skip semantics.

    ``options`` are the fields of :class:`tlfx.config.ExtractOptions`. ``num_workers`` actors (default: as many
    as the cluster fits), each with ``gpus_per_worker`` GPUs (0: CPU) and ``workers`` decoding processes (default 0
    on CPU, 4 with a GPU). ``address``: the cluster (default: a new local instance, or the one ``ray.init`` already
    connected). ``on_block(result)`` is called in the driver after each block's part is durable (progress, tests).
    Every node must see ``out`` and the images at the same paths.
    """
    return run_ray(ExtractOptions(backbone=backbone, data=data, out=out, **options), address=address,
                   num_workers=num_workers, gpus_per_worker=gpus_per_worker, max_restarts=max_restarts,
                   on_block=on_block)


def run_ray(opts: ExtractOptions, *, address: str | None = None, num_workers: int | None = None,
            gpus_per_worker: float = 0.0, max_restarts: int = 3, on_block=None) -> ExtractResult:
    """The Ray engine for an :class:`~tlfx.config.ExtractOptions` (see :func:`extract_ray`)."""
    opts.validate()
    if opts.runtime == "openvino" or opts.precision == "int8":
        raise TlfxError("--engine ray runs torch; drop --runtime openvino / --precision int8 or use --engine local")
    backbone, data, split, root, limit = opts.backbone, opts.data, opts.split, opts.root, opts.limit
    batch_size, workers, device, dtype = opts.batch_size, opts.workers, opts.device, opts.dtype
    part_size, overwrite, progress = opts.part_size, opts.overwrite, opts.progress
    if not isinstance(backbone, str):
        raise TlfxError("--engine ray needs a backbone name (each worker builds its own copy)")
    if num_workers is not None and num_workers < 1:
        raise TlfxError(f"--num-workers must be at least 1, got {num_workers}")
    if gpus_per_worker < 0:
        raise TlfxError(f"--gpus-per-worker must be 0 (CPU) or more, got {gpus_per_worker:g}")
    if device not in (None, "auto", "cpu") and gpus_per_worker <= 0:
        raise TlfxError(f"--device {device} with --engine ray needs --gpus-per-worker above 0 (Ray assigns the GPUs)")
    if device in (None, "auto"):
        device = "cuda" if gpus_per_worker > 0 else "cpu"
    workers = (4 if gpus_per_worker > 0 else 0) if workers is None else workers

    ds = data if isinstance(data, ImageDataset) else load_dataset(data, split=split, root=root, limit=limit)
    listing_skips = list(getattr(ds, "listing_skips", None) or [])
    if opts.strict and listing_skips:
        i, reason = listing_skips[0]
        raise TlfxError(f"cannot use '{terminal(i)}': {terminal(reason)} (--strict; {len(listing_skips)} found while "
                        f"listing the dataset); fix or remove it, then run again")
    out = os.path.abspath(opts.out)
    if not os.path.isdir(os.path.dirname(out)):
        raise TlfxError(f"output directory {os.path.dirname(out)!r} does not exist; create it or choose another --out")
    if part_size is None:
        part_size = default_part_size(len(ds), batch_size)
    elif math.ceil(len(ds) / part_size) > MAX_PARTS:
        sys.stderr.write(f"warning: --part-size {part_size} makes {math.ceil(len(ds) / part_size)} parts; readers of "
                         f"the virtual store need that many open files (ulimit -n), see docs/scaling.md\n")
    if os.path.exists(out) and not overwrite:
        try:
            part_size = int(read_attrs(out).get("part_size") or part_size)  # a resumed store keeps its blocks
        except TlfxError:
            pass

    started = connect_ray(address)
    actors = []
    try:
        cpus = max(1, workers)
        n = num_workers or _cluster_capacity(gpus_per_worker, cpus)
        n = max(1, min(n, math.ceil(len(ds) / part_size)))
        job = {**dataclasses.replace(opts, data=data if isinstance(data, str) else None, device=device,
                                     workers=workers, out=out).options(), "cwd": os.getcwd()}
        env = {k: os.environ[k] for k in _FORWARDED_ENV if os.environ.get(k)}
        options = {"num_cpus": cpus, "num_gpus": gpus_per_worker, "max_restarts": max_restarts,
                   "max_task_retries": max_restarts}
        if env:
            options["runtime_env"] = {"env_vars": env}
        remote_cls = ray.remote(BlockWorker)
        ds_arg = None if isinstance(data, str) else ray.put(ds)
        actors = [remote_cls.options(**options).remote(job, ds_arg) for _ in range(n)]
        actors, infos = _wait_for_actors(actors, cpus, gpus_per_worker)
        info = _check_workers(infos, ds)
        n = len(actors)

        attrs = store_attributes(ds, {**info["config"], "runtime": "torch"}, info["precision"], dtype, root, limit, part_size)
        t0 = time.perf_counter()
        with StoreWriter(out, attrs, overwrite=overwrite) as writer:
            if writer.already_complete:
                return ExtractResult.of_complete_store(out)
            part_size = int(writer.attrs.get("part_size", part_size))
            _remove_temporaries(out)
            blocks = missing_blocks(writer.parts(), len(ds), part_size)
            done_before = len(ds) - sum(e - s for s, e in blocks)
            report = _run_pool(actors, blocks, len(ds), done_before, on_block, progress)
            _remove_temporaries(out)
            seconds = time.perf_counter() - t0
            n_done = len(ds) - done_before
            stats = {"seconds": seconds, "images_per_s": n_done / seconds if seconds else 0.0,
                     "device": info["device"], "resumed_from": done_before, "torch": _torch_version(),
                     "engine": "ray", "ray": ray.__version__, "workers": n, "gpus_per_worker": gpus_per_worker,
                     "hosts": sorted(report["hosts"]), "worker_restarts": report["restarts"],
                     "blocks_requeued": report["requeued"]}
            writer.finalize(stats, virtual=True)
    finally:
        _stop(actors)
        if started:
            ray.shutdown()
    raise_open_files_limit()
    st = FeatureStore(out)
    return ExtractResult(out, len(st), int(st.attrs.get("dim", 0)), len(st.skipped), seconds,
                         n_done / seconds if seconds else 0.0, resumed_from=done_before)


def raise_open_files_limit():
    """Raise this process's soft limit of open files to the hard limit (HDF5 opens every part of a virtual store)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


def _stop(actors, timeout: float = 60.0):
    """Kill the actors and wait until they are gone: no straggler may write a part once the lock is released."""
    for a in actors:
        try:
            ray.kill(a, no_restart=True)
        except Exception:
            pass
    deadline = time.monotonic() + timeout
    for a in actors:
        while time.monotonic() < deadline:
            try:
                ray.get(a.describe.remote(), timeout=min(5.0, max(0.1, deadline - time.monotonic())))
            except (*_LOST, RayTaskError):
                break  # dead
            except ray.exceptions.GetTimeoutError:
                continue  # busy with a block the kill has not interrupted yet (a loaded machine): still alive
            time.sleep(0.05)  # answered: the kill has not landed yet
        else:
            sys.stderr.write("warning: a Ray worker did not stop within a minute after being killed; it may still "
                             "finish the block it holds\n")


def _torch_version():
    import torch

    return torch.__version__


def _check_workers(infos: list[dict], ds: ImageDataset) -> dict:
    for i in infos:
        if i.get("error"):
            raise TlfxError(f"Ray worker on {i['host']}: {i['error']}")
    want = items_digest(ds)
    for i in infos:
        if i["n_items"] != len(ds) or i["digest"] != want:
            raise TlfxError(f"the Ray worker on {i['host']} sees {i['n_items']} items that differ from the driver's "
                            f"{len(ds)}; every node must see the same images at the same path (a shared filesystem)")
    configs = {json.dumps([i["config"], i["precision"]], sort_keys=True) for i in infos}
    if len(configs) > 1:
        hosts = ", ".join(sorted({f"{i['host']} ({i['device']} {i['precision']})" for i in infos}))
        raise TlfxError(f"Ray workers would compute different features ({hosts}); give every worker the same "
                        f"hardware kind, or fix --precision")
    return infos[0]


def _run_pool(actors, blocks, n_items, done_before, on_block, progress) -> dict:
    """Hand ``blocks`` to the actors, at most IN_FLIGHT_PER_ACTOR each; re-queue the blocks of actors that died.

    Ray itself restarts a dead actor and retries its in-flight calls (``max_restarts``/``max_task_retries``); what
    still fails comes back here: the block goes back to the front of the queue, and the actor gets no more work
    until a probe call shows it is back.
    """
    from ..progress import progress_bar

    queue = deque(blocks)
    inflight: dict = {}  # ObjectRef -> ("block", (start, end), actor index) or ("probe", None, actor index)
    failures: dict = {}
    alive, suspect = set(range(len(actors))), set()
    pids: dict = {}
    report = {"hosts": set(), "restarts": 0, "requeued": 0}
    bar = progress_bar(total=n_items, initial=done_before, unit="img", desc="extract", disable=not progress, dynamic_ncols=True)

    def fill():
        for ai in sorted(alive - suspect):
            while queue and sum(1 for k, _, a in inflight.values() if a == ai) < IN_FLIGHT_PER_ACTOR:
                s, e = queue.popleft()
                inflight[actors[ai].run_block.remote(s, e)] = ("block", (s, e), ai)

    try:
        fill()
        while inflight:
            [ref], _ = ray.wait(list(inflight), num_returns=1)
            kind, block, ai = inflight.pop(ref)
            try:
                res = ray.get(ref)
            except RayTaskError as exc:
                cause = getattr(exc, "cause", None)
                if isinstance(cause, TlfxError):
                    raise TlfxError(cause.message) from None
                raise TlfxError(f"a Ray worker failed on items [{block[0]}, {block[1]}): "
                                f"{type(cause).__name__ if cause else 'error'}: {cause or exc}") from None
            except _LOST:
                if kind == "probe":  # the actor could not come back (restarts used up, node gone)
                    alive.discard(ai)
                    suspect.discard(ai)
                else:
                    failures[block] = failures.get(block, 0) + 1
                    if failures[block] >= MAX_BLOCK_LOSSES:
                        raise TlfxError(f"items [{block[0]}, {block[1]}) were lost with {failures[block]} Ray workers; "
                                        f"check the workers' logs (out of memory?) and run the same command to resume"
                                        ) from None
                    queue.appendleft(block)
                    report["requeued"] += 1
                    if ai in alive and ai not in suspect:
                        suspect.add(ai)
                        inflight[actors[ai].describe.remote()] = ("probe", None, ai)
                if not alive:
                    raise TlfxError("every Ray worker died; check the workers' logs and run the same command to "
                                    "resume (finished blocks are kept)") from None
                fill()
                continue
            if kind == "probe":
                suspect.discard(ai)
            else:
                report["hosts"].add(res["host"])
                pids.setdefault(ai, set()).add(res["pid"])
                bar.update(res["end"] - res["start"])
                if on_block is not None:
                    on_block({**res, "worker": ai})
            fill()
    finally:
        bar.close()
    report["restarts"] = sum(len(p) - 1 for p in pids.values())
    return report


__all__ = ["extract_ray", "missing_blocks", "items_digest", "raise_open_files_limit", "BlockWorker", "MAX_PARTS",
           "default_part_size"]
