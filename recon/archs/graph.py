"""Mesh-graph utilities of IntagHand: heavy-edge-matching coarsening, graph orders, Laplacians, upsampling.

Written here in NumPy / SciPy because no kept library in this environment offers this coarsening
(torch_geometric's graclus needs compiled extensions that are not installed, and it neither produces the
balanced binary pooling tree IntagHand relies on nor uses IntagHand's pairing score). The algorithm is the
variant in IntagHand's ``models/model_zoo/coarsening.py`` (forked from Defferrard et al.'s and
hand-graph-cnn's); the code is our own and reproduces that file's pairing, visit order, coarse weights,
permutation and Laplacians (including its quirks, listed in :func:`heavy_edge_matching`).

Conventions of this module (stated once):

- *mesh order*: the hand model's vertex order, ``V`` real vertices (778 for MANO).
- *graph order*: ``N0 = M * 2 ** levels`` positions; position ``j`` at level 0 holds real vertex
  ``perm[j]`` when ``perm[j] < V`` and a *fake* node otherwise. Positions ``(2k, 2k + 1)`` at level ``l`` are the
  two children of node ``k`` at level ``l + 1``, so average pooling by 2 coarsens and repetition by 2
  upsamples (``graph_pool`` / ``graph_repeat``). Level ``levels`` has ``M`` nodes, the matching's own count
  (the reference pads nothing: 63 for official MANO's faces in IntagHand's shipped graphs, 64 for the
  procedural hand with the stable visit order, see docs/intaghand.md).
- Fake nodes carry a copy of their sibling's subtree (``fill_index``, the reference's ``cut_perm``), so that
  pooling averages real vertices only (with multiplicities).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
import torch
from torch import Tensor

__all__ = [
    "LAPLACIAN_RESCALES",
    "CoarseGraphs",
    "coarsen_mesh",
    "mesh_adjacency",
    "heavy_edge_matching",
    "coarsen_graph",
    "compute_permutations",
    "normalized_laplacian",
    "largest_eigenvalue",
    "rescale_laplacian",
    "graph_pool",
    "graph_repeat",
    "cluster_mean_matrix",
    "fit_upsampling",
]

# How the Chebyshev convolutions' Laplacians are rescaled (see rescale_laplacian):
# "reference": IntagHand's code, L / (2 lambda_max) - I on every level but the coarsest, which keeps L;
# "chebyshev": the intended form (the reference's own comment), 2 L / lambda_max - I on every level.
LAPLACIAN_RESCALES = ("reference", "chebyshev")


def mesh_adjacency(faces: np.ndarray, num_verts: int) -> scipy.sparse.csr_matrix:
    """faces: (F, 3) int -> (V, V) float32 symmetric 0/1 adjacency of the mesh edges, no self-loops
    (the reference's ``build_adj_mat``: an edge shared by two faces counts once)."""
    faces = np.asarray(faces, dtype=np.int64)
    rows = np.concatenate([faces[:, 0], faces[:, 1], faces[:, 2], faces[:, 1], faces[:, 2], faces[:, 0]])
    cols = np.concatenate([faces[:, 1], faces[:, 2], faces[:, 0], faces[:, 0], faces[:, 1], faces[:, 2]])
    adjacency = scipy.sparse.csr_matrix(
        (np.ones(rows.shape[0], dtype=np.float32), (rows, cols)), shape=(num_verts, num_verts)
    )
    adjacency.data[:] = 1.0
    adjacency.setdiag(0)
    adjacency.eliminate_zeros()
    adjacency.sort_indices()
    return adjacency


def heavy_edge_matching(weights: scipy.sparse.csr_matrix, degree: np.ndarray) -> np.ndarray:
    """One level of IntagHand's heavy-edge matching.

    weights: (N, N) symmetric non-negative float32 adjacency (self-loops allowed; every node must have a
    stored entry); degree: (N,) float32, the pairing's ``d`` (the reference: the degree without self-loops at
    the first level, with them later). Returns (N,) cluster ids 0..C-1 (each cluster one or two nodes),
    numbered in visit order.

    Nodes are visited by increasing row sum, equal sums by index (a stable ``np.argsort``; the reference calls
    ``np.argsort`` with NumPy's default sort, which overwrites its random permutation at every level but orders
    equal sums as the CPU's SIMD sort kernel does: on one machine 62, 63 or 64 top nodes for the procedural hand
    as NumPy dispatched baseline, AVX2 or AVX-512 kernels, 65 on earlier machines; a checkpoint's graph sizes
    would then depend on the machine that built it). An unmarked node is paired with the unmarked neighbour ``j``
    maximising ``(2 W_ij + W_ii + W_jj) / (d_i + d_j)`` (strictly above 0 and above earlier candidates, in
    column order), or left alone. As in the reference's code (its row bookkeeping, reproduced on purpose so
    that the permutation is the reference's):

    - ``W_ii`` is the first stored entry of row ``i`` (the self-loop only when no neighbour has a smaller
      index; at the first level, with no self-loops, the weight to the lowest-indexed neighbour);
    - row 0's candidates also include the first stored entry of row 1, and the last row's omit its last
      stored entry (the reference's row-length count is off by one at both ends).

    Scores are computed in float32, as the reference's under NumPy 2.
    """
    weights = weights.tocsr()
    weights.sort_indices()
    num_nodes = weights.shape[0]
    starts, values, columns = weights.indptr, weights.data.astype(np.float32), weights.indices
    empty = np.flatnonzero(np.diff(starts) == 0)
    if len(empty):
        raise ValueError(f"heavy-edge matching: node {int(empty[0])} has no edge (isolated vertices are not supported)")
    first = values[starts[:-1]]  # (N,) the reference's "W_ii"
    degree = np.asarray(degree, dtype=np.float32).ravel()
    row_sums = np.asarray(weights.sum(axis=0), dtype=np.float32).ravel()
    order = np.argsort(row_sums, kind="stable")  # ties by index: the same graphs on every CPU
    marked = np.zeros(num_nodes, dtype=bool)
    cluster = np.zeros(num_nodes, dtype=np.int64)
    count = 0
    for node in order:
        if marked[node]:
            continue
        marked[node] = True
        begin, end = starts[node], starts[node + 1]
        if node == 0 and num_nodes > 1:
            end += 1  # the reference's off-by-one: row 0 also scans row 1's first entry
        elif node == num_nodes - 1 and num_nodes > 1:
            end -= 1  # ... and the last row misses its last entry
        neighbours, w_ij = columns[begin:end], values[begin:end]
        score = (np.float32(2.0) * w_ij + first[node] + first[neighbours]) / (
            degree[node] + degree[neighbours] + np.float32(1e-9)
        )
        score = np.where(marked[neighbours], np.float32(0.0), score)
        best = -1
        if len(score) and score.max() > 0.0:
            best = int(neighbours[int(np.argmax(score))])  # the first maximum, as the reference's strict ">"
        cluster[node] = count
        if best >= 0:
            cluster[best] = count
            marked[best] = True
        count += 1
    return cluster


def coarsen_graph(
    adjacency: scipy.sparse.csr_matrix, levels: int
) -> tuple[list[scipy.sparse.csr_matrix], list[np.ndarray]]:
    """``levels`` rounds of :func:`heavy_edge_matching` (the reference's ``HEM``).

    adjacency: (N, N) float32 symmetric, no self-loops. Returns (graphs, parents): ``graphs[0]`` is the input,
    ``graphs[l + 1]`` the coarse graph after round ``l`` with *summed* edge weights and the merged pairs'
    internal edges kept as self-loops (weight 2 W_ij, both directions); ``parents[l]`` the cluster ids of round l.
    """
    graphs, parents = [adjacency.tocsr()], []
    degree = np.asarray(adjacency.sum(axis=0), dtype=np.float32).ravel() - adjacency.diagonal().astype(np.float32)
    for _ in range(levels):
        cluster = heavy_edge_matching(graphs[-1], degree)
        parents.append(cluster)
        coo = graphs[-1].tocoo()
        size = int(cluster.max()) + 1
        coarse = scipy.sparse.csr_matrix(
            (coo.data.astype(np.float32), (cluster[coo.row], cluster[coo.col])), shape=(size, size)
        )
        coarse.sum_duplicates()
        coarse.eliminate_zeros()
        coarse.sort_indices()
        graphs.append(coarse)
        degree = np.asarray(coarse.sum(axis=0), dtype=np.float32).ravel()  # self-loops included from now on
    return graphs, parents


def compute_permutations(parents: List[np.ndarray]) -> List[np.ndarray]:
    """The graph order of every level from the cluster ids of each coarsening step (the reference's
    ``compute_perm``).

    parents[l]: (N_l,) cluster id at level l + 1 of each node of level l. Returns ``perms`` with
    ``perms[l]`` (M * 2 ** (L - l),): node index at level l of each position (an index >= N_l is a fake node),
    such that positions (2k, 2k + 1) of level l are the children of position k of level l + 1 (children in
    increasing index; a singleton's fake sibling after it; a fake node's two fake children);
    ``perms[L]`` is the identity on the M top nodes.
    """
    top = int(parents[-1].max()) + 1
    perms = [np.arange(top)]
    for parent in parents[::-1]:
        next_fake = len(parent)
        order = []
        for node in perms[-1]:
            children = list(np.flatnonzero(parent == node))
            if len(children) > 2:
                raise AssertionError("heavy-edge matching produced a cluster of more than two nodes")
            while len(children) < 2:
                children.append(next_fake)
                next_fake += 1
            order.extend(children)
        perms.append(np.asarray(order, dtype=np.int64))
    return perms[::-1]


def normalized_laplacian(adjacency: np.ndarray) -> np.ndarray:
    """(N, N) weighted adjacency (self-loops included, as the reference's coarse graphs) -> dense
    ``I - D^-1/2 A D^-1/2`` with ``D`` the row sums; isolated nodes (fake ones) get ``L_ii = 1``."""
    dense = np.asarray(adjacency, dtype=np.float64)
    degree = dense.sum(axis=1)
    inv_sqrt = np.where(degree > 0, 1.0 / np.sqrt(np.where(degree > 0, degree, 1.0)), 0.0)
    return np.eye(dense.shape[0]) - inv_sqrt[:, None] * dense * inv_sqrt[None, :]


def largest_eigenvalue(laplacian: np.ndarray) -> float:
    """The largest-magnitude eigenvalue of a symmetric (N, N) matrix (Lanczos, as the reference's ``lmax_L``;
    dense for N <= 2)."""
    if laplacian.shape[0] <= 2:
        return float(np.abs(np.linalg.eigvalsh(laplacian)).max())
    matrix = scipy.sparse.csr_matrix(laplacian)
    return float(scipy.sparse.linalg.eigsh(matrix, k=1, which="LM", return_eigenvectors=False)[0])


def rescale_laplacian(laplacian: np.ndarray, lambda_max: float, rescale: str, coarsest: bool) -> np.ndarray:
    """The Laplacian a Chebyshev convolution uses, per ``rescale`` (see LAPLACIAN_RESCALES).

    "reference": ``L / (2 lambda_max) - I`` (IntagHand's ``rescale_L``: ``L /= lmax * 2; L -= I``, spectrum in
    [-1, -1/2]), and ``L`` unchanged on the coarsest level (the reference rescales only its four finer
    levels). "chebyshev": ``2 L / lambda_max - I`` on every level (spectrum in [-1, 1]).
    """
    if rescale not in LAPLACIAN_RESCALES:
        raise ValueError(f"laplacian rescale {rescale!r}: expected one of {', '.join(LAPLACIAN_RESCALES)}")
    identity = np.eye(laplacian.shape[0])
    if rescale == "chebyshev":
        return 2.0 * laplacian / lambda_max - identity
    if coarsest:
        return laplacian.copy()
    return laplacian / (2.0 * lambda_max) - identity


def graph_pool(x: Tensor, factor: int = 2) -> Tensor:
    """x: (B, N, C) in graph order -> (B, N / factor, C): mean over each block of ``factor`` positions."""
    batch, nodes, channels = x.shape
    return x.reshape(batch, nodes // factor, factor, channels).mean(dim=2)


def graph_repeat(x: Tensor, factor: int = 2) -> Tensor:
    """x: (B, N, C) in graph order -> (B, N * factor, C): each node repeated (the inverse tree of pooling)."""
    return x.repeat_interleave(factor, dim=1)


@dataclass
class CoarseGraphs:
    """The coarsening of one mesh.

    num_verts: V real vertices. sizes: node count per level, ``sizes[l] = M * 2 ** (levels - l)``.
    perm: (N0,) real vertex (< V) or fake (>= V) of each graph position.
    fill_index: (N0,) the real vertex whose value each graph position carries (fake nodes copy a sibling).
    inverse: (V,) graph position of each real vertex.
    laplacians: per level, (N_l, N_l) normalised Laplacian ``I - D^-1/2 A D^-1/2`` in that level's graph order
        (not rescaled; fake nodes isolated); lambda_max: per level, its largest eigenvalue.
    adjacencies: per level, (N_l, N_l) weighted adjacency in graph order (self-loops and summed weights of the
        coarse graphs kept, as the reference's).
    """

    num_verts: int
    sizes: List[int]
    perm: np.ndarray
    fill_index: np.ndarray
    inverse: np.ndarray
    laplacians: List[np.ndarray]
    lambda_max: List[float]
    adjacencies: List[np.ndarray]

    def chebyshev_laplacian(self, level: int, rescale: str = "reference") -> np.ndarray:
        """(N_l, N_l) float64, the rescaled Laplacian of ``level`` (see :func:`rescale_laplacian`)."""
        coarsest = level == len(self.sizes) - 1
        return rescale_laplacian(self.laplacians[level], self.lambda_max[level], rescale, coarsest)

    def to_graph(self, x: Tensor) -> Tensor:
        """x: (B, V, C) mesh order -> (B, N0, C) graph order (fake positions copy a sibling)."""
        return x[:, torch.as_tensor(self.fill_index, device=x.device)]

    def to_mesh(self, x: Tensor) -> Tensor:
        """x: (B, N0, C) graph order -> (B, V, C) mesh order (the real positions)."""
        return x[:, torch.as_tensor(self.inverse, device=x.device)]

    def pool_to(self, x: Tensor, level: int) -> Tensor:
        """x: (B, V, C) mesh order -> (B, sizes[level], C): the cluster means of that level."""
        graph = self.to_graph(x)
        return graph_pool(graph, 2**level) if level > 0 else graph

    def level_of(self, num_nodes: int) -> int:
        if num_nodes not in self.sizes:
            raise ValueError(f"no coarsening level has {num_nodes} nodes (levels: {self.sizes})")
        return self.sizes.index(num_nodes)


def coarsen_mesh(faces: np.ndarray, num_verts: int, levels: int = 4) -> CoarseGraphs:
    """Coarsen a triangle mesh ``levels`` times as IntagHand's ``build_graph`` does.

    faces: (F, 3) int; num_verts: V (every vertex must lie on a face). Heavy-edge matching
    (:func:`coarsen_graph`), fake nodes so that each level halves (:func:`compute_permutations`), the graphs
    permuted into graph order, their normalised Laplacians and largest eigenvalues. The same on every machine (the
    visit order is a stable sort of the row sums).
    Returns :class:`CoarseGraphs`.
    """
    adjacency = mesh_adjacency(faces, num_verts)
    graphs, parents = coarsen_graph(adjacency, levels)
    perms = compute_permutations(parents)
    sizes = [len(p) for p in perms]

    laplacians, lambda_max, adjacencies = [], [], []
    for level, graph in enumerate(graphs):
        perm = perms[level]
        real = np.flatnonzero(perm < graph.shape[0])
        dense = np.zeros((len(perm), len(perm)))
        sub = np.asarray(graph.todense(), dtype=np.float64)
        dense[np.ix_(real, real)] = sub[perm[real]][:, perm[real]]
        adjacencies.append(dense)
        laplacian = normalized_laplacian(dense)
        laplacians.append(laplacian)
        lambda_max.append(largest_eigenvalue(laplacian))

    perm0 = perms[0]
    fill = np.where(perm0 < num_verts, perm0, -1)
    for level in range(levels):  # a wholly fake block copies its sibling block, from fine to coarse
        block = 2**level
        blocks = fill.reshape(-1, 2, block)
        for pair in blocks:
            if (pair[1] < 0).all():
                pair[1] = pair[0]
            elif (pair[0] < 0).all():
                pair[0] = pair[1]
        fill = blocks.reshape(-1)
    if (fill < 0).any():
        raise AssertionError("coarsening left a graph position without a real vertex")
    inverse = np.empty(num_verts, dtype=np.int64)
    real_positions = np.flatnonzero(perm0 < num_verts)
    inverse[perm0[real_positions]] = real_positions
    return CoarseGraphs(
        num_verts=num_verts,
        sizes=sizes,
        perm=perm0,
        fill_index=fill,
        inverse=inverse,
        laplacians=laplacians,
        lambda_max=lambda_max,
        adjacencies=adjacencies,
    )


def cluster_mean_matrix(graphs: CoarseGraphs, level: int) -> np.ndarray:
    """(sizes[level], V) the linear map mesh -> level ``level`` of :meth:`CoarseGraphs.pool_to`."""
    block = 2**level
    matrix = np.zeros((graphs.sizes[level], graphs.num_verts))
    for position, vertex in enumerate(graphs.fill_index):
        matrix[position // block, vertex] += 1.0 / block
    return matrix


def fit_upsampling(graphs: CoarseGraphs, level: int, sample_verts: np.ndarray, ridge: float = 1e-3) -> np.ndarray:
    """The linear map level ``level`` -> mesh, fitted on example meshes: (V, sizes[level]), rows summing to 1.

    Each real vertex is an affine combination of its own cluster's mean and the means of the clusters adjacent
    to it at that level (a local, barycentric-like stencil): ``x_v = c_own + sum_j w_j (c_j - c_own)``, the
    weights ``w`` fitted by ridge-regularised least squares over the samples' coordinates (ridge pulls toward
    plain cluster assignment, ``U[v, own] = 1``). The rows sum to one, so the map commutes with translations,
    and the same weights act on x, y and z, so it commutes with rotations and scaling.

    sample_verts: (S, V, 3) example meshes (e.g. the hand model in random poses and shapes), any unit.
    """
    means = np.matmul(cluster_mean_matrix(graphs, level)[None], sample_verts)  # (S, N_l, 3)
    block = 2**level
    adjacency = graphs.adjacencies[level]
    upsample = np.zeros((graphs.num_verts, graphs.sizes[level]))
    for vertex in range(graphs.num_verts):
        own = graphs.inverse[vertex] // block
        neighbours = np.flatnonzero(adjacency[own] > 0)
        neighbours = neighbours[neighbours != own]  # coarse graphs keep self-loops
        upsample[vertex, own] = 1.0
        if len(neighbours) == 0:
            continue
        features = (means[:, neighbours] - means[:, own : own + 1]).transpose(0, 2, 1).reshape(-1, len(neighbours))
        target = (sample_verts[:, vertex] - means[:, own]).reshape(-1)  # (S * 3,)
        scale = float(np.mean(features**2)) + 1e-12
        gram = features.T @ features + ridge * scale * features.shape[0] * np.eye(len(neighbours))
        weights = np.linalg.solve(gram, features.T @ target)
        upsample[vertex, neighbours] = weights
        upsample[vertex, own] = 1.0 - weights.sum()
    return upsample
