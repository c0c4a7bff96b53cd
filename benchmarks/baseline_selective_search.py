"""Selective-search-style proposal baseline for the pseudo-label engine (issue 5).

A strong *classical* mask-proposal method, re-run here so the comparison with
``python -m unsam.pseudo`` is measured, not quoted:

* Felzenszwalb–Huttenlocher graph segmentation at full resolution (own numpy implementation,
  8-connectivity, RGB Euclidean edge weights after a sigma = 0.8 Gaussian, min size 50) at scales
  ``50, 100, 200, 400, 800, 1600`` (``k`` in 0..255 units, like skimage's ``scale``);
* per scale, greedy merging of the most similar *adjacent* pair of regions, similarity = colour
  histogram intersection (25 bins per RGB channel) + size + fill (Uijlings et al.);
  every initial region and every merge is a proposal;
* proposals ranked by ``random × hierarchy position`` (position 1 = the last merge), all scales
  pooled, de-duplicated at mask IoU 0.9, at most 1000 masks per image.

Writes one SA-1B JSON per image (so ``python -m unsam.pseudo.evaluate`` scores it the same way)
and prints AR/AP when ``--gt`` is given::

    python benchmarks/baseline_selective_search.py --input IMAGES --output DIR \
        [--gt instances.json] [--out metrics.json] [--end-id N] [--workers 2]
"""

import argparse
import heapq
import logging
import multiprocessing
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import unsam.compat  # noqa: E402,F401

import cv2  # noqa: E402
from pycocotools import mask as mask_utils  # noqa: E402

from unsam.io.sa1b import annotation_from_mask, write_sa1b_json  # noqa: E402
from unsam.pseudo.runner import list_images, read_image, select  # noqa: E402

logger = logging.getLogger("baseline_selective_search")

SCALES = (50, 100, 200, 400, 800, 1600)


def felzenszwalb_edges(image: np.ndarray, sigma: float = 0.8):
    """8-connected grid edges sorted by weight: (a, b, w) int64/int64/float64 arrays."""
    h, w = image.shape[:2]
    img = image.astype(np.float32)
    if sigma > 0:
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    idx = np.arange(h * w).reshape(h, w)
    a_list, b_list, w_list = [], [], []
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        ys0, ys1 = 0, h - dy
        xs0, xs1 = max(0, -dx), w - max(0, dx)
        a = idx[ys0:ys1, xs0:xs1]
        b = idx[ys0 + dy : ys1 + dy, xs0 + dx : xs1 + dx]
        d = np.sqrt(
            ((img[ys0:ys1, xs0:xs1] - img[ys0 + dy : ys1 + dy, xs0 + dx : xs1 + dx]) ** 2).sum(-1)
        )
        a_list.append(a.ravel())
        b_list.append(b.ravel())
        w_list.append(d.ravel())
    a = np.concatenate(a_list)
    b = np.concatenate(b_list)
    wt = np.concatenate(w_list).astype(np.float64)
    order = np.argsort(wt, kind="stable")
    return a[order], b[order], wt[order]


_C_SOURCE = r"""
#include <stdint.h>
static int64_t find(int64_t *p, int64_t x) {
    int64_t r = x;
    while (p[r] != r) r = p[r];
    while (p[x] != r) { int64_t n = p[x]; p[x] = r; x = n; }
    return r;
}
void felz(int64_t n, int64_t m, const int64_t *a, const int64_t *b, const double *w,
          double k, int64_t min_size, int64_t *parent, int64_t *size, double *th) {
    for (int64_t i = 0; i < n; i++) { parent[i] = i; size[i] = 1; th[i] = k; }
    for (int64_t e = 0; e < m; e++) {
        int64_t ra = find(parent, a[e]), rb = find(parent, b[e]);
        if (ra != rb && w[e] <= th[ra] && w[e] <= th[rb]) {
            if (size[ra] < size[rb]) { int64_t t = ra; ra = rb; rb = t; }
            parent[rb] = ra; size[ra] += size[rb]; th[ra] = w[e] + k / (double)size[ra];
        }
    }
    for (int64_t e = 0; e < m; e++) {
        int64_t ra = find(parent, a[e]), rb = find(parent, b[e]);
        if (ra != rb && (size[ra] < min_size || size[rb] < min_size)) {
            if (size[ra] < size[rb]) { int64_t t = ra; ra = rb; rb = t; }
            parent[rb] = ra; size[ra] += size[rb];
        }
    }
    for (int64_t i = 0; i < n; i++) parent[i] = find(parent, i);
}
"""
_C_LIB = None


def _compiled():
    """The C union-find kernel, compiled once per process with the system C compiler (or None).

    The algorithm is inherently sequential (edges in sorted order); a pure-Python loop takes
    ~5 s per scale on a 640×480 image, the C kernel ~0.05 s. Without a compiler the Python
    version below is used (same results, slower).
    """
    global _C_LIB
    if _C_LIB is None:
        import ctypes
        import shutil
        import subprocess
        import tempfile

        _C_LIB = False
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc:
            tmp = tempfile.mkdtemp(prefix="felz_")
            src, lib = Path(tmp) / "felz.c", Path(tmp) / "felz.so"
            src.write_text(_C_SOURCE)
            try:
                subprocess.run(
                    [cc, "-O2", "-shared", "-fPIC", str(src), "-o", str(lib)],
                    check=True,
                    capture_output=True,
                )
                _C_LIB = ctypes.CDLL(str(lib))
            except (subprocess.CalledProcessError, OSError) as e:
                logger.warning("C compiler failed (%s); using the slow Python Felzenszwalb", e)
            finally:  # a loaded library stays mapped after its file is removed
                shutil.rmtree(tmp, ignore_errors=True)
    return _C_LIB or None


def felzenszwalb(n_pixels: int, edges, k: float, min_size: int = 50) -> np.ndarray:
    """Felzenszwalb–Huttenlocher segmentation on pre-sorted edges → (n_pixels,) labels 0..R-1."""
    a_arr, b_arr, w_arr = edges
    lib = _compiled()
    if lib is not None:
        import ctypes

        a = np.ascontiguousarray(a_arr, np.int64)
        b = np.ascontiguousarray(b_arr, np.int64)
        wt = np.ascontiguousarray(w_arr, np.float64)
        parent = np.empty(n_pixels, np.int64)
        size = np.empty(n_pixels, np.int64)
        th = np.empty(n_pixels, np.float64)
        ptr = lambda x: x.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
        lib.felz(
            ctypes.c_int64(n_pixels),
            ctypes.c_int64(len(a)),
            ptr(a),
            ptr(b),
            ptr(wt),
            ctypes.c_double(k),
            ctypes.c_int64(min_size),
            ptr(parent),
            ptr(size),
            ptr(th),
        )
        _, labels = np.unique(parent, return_inverse=True)
        return labels
    return _felzenszwalb_python(n_pixels, edges, k, min_size)


def _felzenszwalb_python(n_pixels: int, edges, k: float, min_size: int = 50) -> np.ndarray:
    a_arr, b_arr, w_arr = edges
    parent = list(range(n_pixels))
    size = [1] * n_pixels
    thresh = [float(k)] * n_pixels  # Int(C) + k/|C| with Int = 0 for single pixels

    def find(x):
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    a_l, b_l, w_l = a_arr.tolist(), b_arr.tolist(), w_arr.tolist()
    for a, b, wt in zip(a_l, b_l, w_l):
        ra, rb = find(a), find(b)
        if ra != rb and wt <= thresh[ra] and wt <= thresh[rb]:
            if size[ra] < size[rb]:
                ra, rb = rb, ra
            parent[rb] = ra
            size[ra] += size[rb]
            thresh[ra] = wt + k / size[ra]
    # enforce the minimum component size, cheapest edges first (as the reference code does)
    for a, b in zip(a_l, b_l):
        ra, rb = find(a), find(b)
        if ra != rb and (size[ra] < min_size or size[rb] < min_size):
            if size[ra] < size[rb]:
                ra, rb = rb, ra
            parent[rb] = ra
            size[ra] += size[rb]
    roots = np.array([find(x) for x in range(n_pixels)])
    _, labels = np.unique(roots, return_inverse=True)
    return labels


def hierarchical_grouping(image: np.ndarray, labels: np.ndarray) -> List[Tuple[List[int], int]]:
    """Selective-search merging → [(base region ids, hierarchy position)], position 1 = top."""
    h, w = labels.shape
    n = int(labels.max()) + 1
    im_size = float(h * w)
    sizes = np.bincount(labels.ravel(), minlength=n).astype(np.float64)
    hist = np.zeros((n, 75))
    bins = np.minimum((image.astype(np.int64) * 25) // 256, 24)  # (h, w, 3)
    flat_lab = labels.ravel()
    for ch in range(3):
        np.add.at(hist, (flat_lab, ch * 25 + bins[..., ch].ravel()), 1.0)
    hist /= np.maximum(hist.sum(1, keepdims=True), 1)
    ys, xs = np.mgrid[0:h, 0:w]
    x0 = np.full(n, w, np.int64)
    y0 = np.full(n, h, np.int64)
    x1 = np.zeros(n, np.int64)
    y1 = np.zeros(n, np.int64)
    np.minimum.at(x0, flat_lab, xs.ravel())
    np.minimum.at(y0, flat_lab, ys.ravel())
    np.maximum.at(x1, flat_lab, xs.ravel())
    np.maximum.at(y1, flat_lab, ys.ravel())
    # adjacency
    pairs = set()
    for la, lb in ((labels[:, :-1], labels[:, 1:]), (labels[:-1], labels[1:])):
        m = la != lb
        p = np.stack([np.minimum(la[m], lb[m]), np.maximum(la[m], lb[m])], 1)
        pairs.update(map(tuple, np.unique(p, axis=0).tolist()))
    regions: Dict[int, dict] = {}
    for i in range(n):
        regions[i] = dict(
            size=sizes[i], hist=hist[i], box=[x0[i], y0[i], x1[i], y1[i]], members=[i]
        )
    neighbours: Dict[int, set] = {i: set() for i in range(n)}
    for a, b in pairs:
        neighbours[a].add(b)
        neighbours[b].add(a)

    def sim(a, b):
        ra, rb = regions[a], regions[b]
        colour = np.minimum(ra["hist"], rb["hist"]).sum()
        size = 1.0 - (ra["size"] + rb["size"]) / im_size
        bx = (max(ra["box"][2], rb["box"][2]) - min(ra["box"][0], rb["box"][0]) + 1) * (
            max(ra["box"][3], rb["box"][3]) - min(ra["box"][1], rb["box"][1]) + 1
        )
        fill = 1.0 - (bx - ra["size"] - rb["size"]) / im_size
        return colour + size + fill

    heap = [(-sim(a, b), a, b) for a, b in pairs]
    heapq.heapify(heap)
    alive = set(range(n))
    created = []  # order of creation: base regions first, then merges
    for i in range(n):
        created.append(regions[i]["members"])
    nxt = n
    while heap:
        _, a, b = heapq.heappop(heap)
        if a not in alive or b not in alive:
            continue
        ra, rb = regions[a], regions[b]
        s = ra["size"] + rb["size"]
        regions[nxt] = dict(
            size=s,
            hist=(ra["hist"] * ra["size"] + rb["hist"] * rb["size"]) / s,
            box=[
                min(ra["box"][0], rb["box"][0]),
                min(ra["box"][1], rb["box"][1]),
                max(ra["box"][2], rb["box"][2]),
                max(ra["box"][3], rb["box"][3]),
            ],
            members=ra["members"] + rb["members"],
        )
        alive -= {a, b}
        nb = (neighbours.pop(a) | neighbours.pop(b)) - {a, b}
        for x in nb:
            neighbours[x] -= {a, b}
            neighbours[x].add(nxt)
        neighbours[nxt] = nb
        alive.add(nxt)
        created.append(regions[nxt]["members"])
        for x in nb:
            heapq.heappush(heap, (-sim(nxt, x), x, nxt))
        nxt += 1
    total = len(created)
    # hierarchy position: the last region created is position 1 (the top of the hierarchy)
    return [(members, total - i) for i, members in enumerate(created)]


def propose(
    image: np.ndarray,
    rng: np.random.Generator,
    scales: Sequence[int] = SCALES,
    max_masks: int = 1000,
    dedup_iou: float = 0.9,
) -> List[dict]:
    """Selective-search mask proposals for one RGB image → SA-1B annotations (best first)."""
    h, w = image.shape[:2]
    edges = felzenszwalb_edges(image, 0.8)
    cands = []  # (rank value, scale index, members)
    label_maps = []
    for si, k in enumerate(scales):
        labels = felzenszwalb(h * w, edges, k, 50).reshape(h, w)
        label_maps.append(labels)
        for members, pos in hierarchical_grouping(image, labels):
            cands.append((rng.random() * pos, si, members))
    cands.sort(key=lambda c: c[0])
    kept_rles, kept_areas, anns = [], [], []
    for value, si, members in cands:
        lut = np.zeros(int(label_maps[si].max()) + 1, bool)
        lut[members] = True
        m = lut[label_maps[si]]
        if m.sum() == h * w:
            continue
        area = int(m.sum())
        # IoU <= min(area)/max(area): only masks of similar area can be duplicates
        near = [j for j, a in enumerate(kept_areas) if min(a, area) > dedup_iou * max(a, area)]
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        if (
            near
            and np.max(mask_utils.iou([rle], [kept_rles[j] for j in near], [0] * len(near)))
            > dedup_iou
        ):
            continue
        kept_rles.append(rle)
        kept_areas.append(area)
        # higher = better for COCO ranking: invert the (lower-is-better) rank value
        anns.append(annotation_from_mask(m, len(anns), predicted_iou=float(1.0 / (1.0 + value))))
        if len(anns) >= max_masks:
            break
    return anns


def _propose_file(task) -> None:
    """One image → its SA-1B JSON; seeded per image so the result does not depend on workers."""
    image_id, path, target, seed, max_masks = task
    image = read_image(path)
    anns = propose(image, np.random.default_rng(seed + image_id), max_masks=max_masks)
    write_sa1b_json(
        target,
        {
            "image_id": image_id,
            "width": image.shape[1],
            "height": image.shape[0],
            "file_name": str(path),
        },
        anns,
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--input", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--gt", default=None, help="COCO instances JSON: evaluate after the run")
    ap.add_argument("--out", default=None, help="metrics JSON (with --gt)")
    ap.add_argument("--start-id", type=int, default=0)
    ap.add_argument("--end-id", type=int, default=None)
    ap.add_argument("--shard", default="0/1")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-masks", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=1, help="processes, one image each at a time")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from tqdm import tqdm

    i, n = (int(x) for x in args.shard.split("/"))
    out = Path(args.output)
    tasks = [
        (image_id, path, out / f"{path.stem}.json", args.seed, args.max_masks)
        for image_id, path in select(list_images(args.input), args.start_id, args.end_id, (i, n))
        if not (out / f"{path.stem}.json").exists()
    ]  # finished images are skipped (resume)
    t0 = time.time()
    if args.workers > 1:
        # one thread per worker: the workers already fill the cores
        with multiprocessing.get_context("spawn").Pool(
            args.workers, initializer=cv2.setNumThreads, initargs=(1,)
        ) as pool:
            for _ in tqdm(pool.imap_unordered(_propose_file, tasks), total=len(tasks), unit="img"):
                pass
    else:
        for task in tqdm(tasks, unit="img"):
            _propose_file(task)
    done = len(tasks)
    secs = (time.time() - t0) / max(1, done)
    print(f"selective search: {done} images, {secs:.2f} s/image (wall, {args.workers} worker(s))")
    if args.gt:
        from unsam.evaluation.whole_image import report_metrics
        from unsam.pseudo.evaluate import evaluate_dir

        metrics = evaluate_dir(args.gt, out)
        if done:
            metrics["seconds_per_image"] = secs
        report_metrics(metrics, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
