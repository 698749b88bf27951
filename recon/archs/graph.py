"""Mesh-graph utilities of IntagHand: Graclus-style coarsening, graph orders, Laplacians, upsampling.

Written here in NumPy / SciPy because no kept library in this environment offers a deterministic
heavy-edge-matching coarsening with fake nodes (torch_geometric's graclus needs compiled extensions that are
not installed, and it does not produce the balanced binary pooling tree IntagHand relies on). The algorithm is
the one of Defferrard et al. (NeurIPS 2016, ``coarsening.py``), which IntagHand uses; the code is our own.

Conventions of this module (stated once):

- *mesh order*: the hand model's vertex order, ``V`` real vertices (778 for MANO).
- *graph order*: ``N0 = M * 2 ** levels`` positions; position ``j`` at level 0 holds real vertex
  ``perm[j]`` when ``perm[j] < V`` and a *fake* node otherwise. Positions ``(2k, 2k + 1)`` at level ``l`` are the
  two children of node ``k`` at level ``l + 1``, so average pooling by 2 coarsens and repetition by 2
  upsamples (``graph_pool`` / ``graph_repeat``). Level ``levels`` has ``M`` nodes (63 for MANO's faces, the
  IntagHand chain 1008 -> 504 -> 252 -> 126 -> 63).
- Fake nodes carry a copy of their sibling's value (``fill_index``), so that pooling averages real vertices
  only (with multiplicities).
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
    "CoarseGraphs",
    "coarsen_mesh",
    "mesh_adjacency",
    "heavy_edge_matching",
    "compute_permutations",
    "normalized_laplacian",
    "rescale_laplacian",
    "graph_pool",
    "graph_repeat",
    "cluster_mean_matrix",
    "fit_upsampling",
]


def mesh_adjacency(faces: np.ndarray, num_verts: int) -> scipy.sparse.csr_matrix:
    """faces: (F, 3) int -> (V, V) symmetric 0/1 adjacency of the mesh edges, no self loops."""
    faces = np.asarray(faces, dtype=np.int64)
    rows = np.concatenate([faces[:, 0], faces[:, 1], faces[:, 2], faces[:, 1], faces[:, 2], faces[:, 0]])
    cols = np.concatenate([faces[:, 1], faces[:, 2], faces[:, 0], faces[:, 0], faces[:, 1], faces[:, 2]])
    adjacency = scipy.sparse.csr_matrix((np.ones(rows.shape[0]), (rows, cols)), shape=(num_verts, num_verts))
    adjacency.data[:] = 1.0
    adjacency.setdiag(0)
    adjacency.eliminate_zeros()
    return adjacency.tocsr()


def heavy_edge_matching(weights: scipy.sparse.csr_matrix, visit_order: np.ndarray) -> np.ndarray:
    """One level of Graclus heavy-edge matching (normalised-cut weights).

    weights: (N, N) symmetric non-negative adjacency; visit_order: (N,) permutation of the nodes.
    Each unmarked node, in visit order, is matched with the unmarked neighbour maximising
    ``w_ij * (1 / d_i + 1 / d_j)`` (d = weighted degree), or left alone. Returns (N,) cluster ids 0..C-1
    (each cluster holds one or two nodes), numbered in visit order.
    """
    weights = weights.tocsr()
    degree = np.asarray(weights.sum(axis=1)).ravel()
    degree = np.where(degree > 0, degree, 1.0)
    num_nodes = weights.shape[0]
    cluster = np.full(num_nodes, -1, dtype=np.int64)
    count = 0
    for node in visit_order:
        if cluster[node] >= 0:
            continue
        start, end = weights.indptr[node], weights.indptr[node + 1]
        best, best_value = -1, 0.0
        for neighbour, value in zip(weights.indices[start:end], weights.data[start:end]):
            if neighbour == node or cluster[neighbour] >= 0:
                continue
            score = value * (1.0 / degree[node] + 1.0 / degree[neighbour])
            if score > best_value:  # strict: ties keep the first neighbour in index order (deterministic)
                best, best_value = neighbour, score
        cluster[node] = count
        if best >= 0:
            cluster[best] = count
        count += 1
    return cluster


def compute_permutations(parents: List[np.ndarray], top_nodes: int | None = None) -> List[np.ndarray]:
    """The graph order of every level from the cluster ids of each coarsening step.

    parents[l]: (N_l,) cluster id at level l + 1 of each node of level l. Returns ``perms`` with
    ``perms[l]`` (M * 2 ** (L - l),): node index at level l of each position (an index >= N_l is a fake node),
    such that positions (2k, 2k + 1) of level l are the children of position k of level l + 1;
    ``perms[L]`` is the identity on the M top nodes, followed by fake top nodes up to ``top_nodes`` if given.
    """
    top = int(parents[-1].max()) + 1
    if top_nodes is not None and top_nodes < top:
        raise ValueError(f"coarsening: the mesh coarsens to {top} top nodes, more than top_nodes={top_nodes}")
    perms = [np.arange(top if top_nodes is None else top_nodes)]
    for parent in parents[::-1]:
        next_fake = len(parent)
        order = []
        for node in perms[-1]:
            children = list(np.flatnonzero(parent == node)) if node < parent.max() + 1 else []
            if len(children) > 2:
                raise AssertionError("heavy-edge matching produced a cluster of more than two nodes")
            while len(children) < 2:
                children.append(next_fake)
                next_fake += 1
            order.extend(children)
        perms.append(np.asarray(order, dtype=np.int64))
    return perms[::-1]


def normalized_laplacian(adjacency: scipy.sparse.spmatrix) -> np.ndarray:
    """(N, N) adjacency -> dense I - D^-1/2 A D^-1/2 (isolated nodes, e.g. fake ones, get L_ii = 1)."""
    dense = np.asarray(adjacency.todense(), dtype=np.float64)
    degree = dense.sum(axis=1)
    inv_sqrt = np.where(degree > 0, 1.0 / np.sqrt(np.where(degree > 0, degree, 1.0)), 0.0)
    return np.eye(dense.shape[0]) - inv_sqrt[:, None] * dense * inv_sqrt[None, :]


def rescale_laplacian(laplacian: np.ndarray) -> np.ndarray:
    """2 L / lambda_max - I: the Chebyshev domain [-1, 1] (lambda_max by Lanczos on the sparse matrix)."""
    lambda_max = float(
        scipy.sparse.linalg.eigsh(scipy.sparse.csr_matrix(laplacian), k=1, which="LA", return_eigenvectors=False)[0]
    )
    return 2.0 * laplacian / lambda_max - np.eye(laplacian.shape[0])


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
    laplacians: per level, (N_l, N_l) rescaled normalised Laplacian in that level's graph order (fake nodes
        isolated).
    adjacencies: per level, (N_l, N_l) 0/1 adjacency in graph order (real nodes of the coarsened graph).
    """

    num_verts: int
    sizes: List[int]
    perm: np.ndarray
    fill_index: np.ndarray
    inverse: np.ndarray
    laplacians: List[np.ndarray]
    adjacencies: List[np.ndarray]

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


FIRST_ORDER_TRIES = 64  # seeded first-level visit orders tried when index order coarsens to too many nodes


def _match_levels(
    adjacency: scipy.sparse.csr_matrix, levels: int, first_order: np.ndarray
) -> tuple[list[scipy.sparse.csr_matrix], list[np.ndarray]]:
    """``levels`` rounds of heavy-edge matching: (graphs, level 0 first; parents, cluster ids per round).
    The first round visits nodes in ``first_order``, later ones by increasing weighted degree (stable)."""
    graphs, parents = [adjacency], []
    order = first_order
    for _ in range(levels):
        cluster = heavy_edge_matching(graphs[-1], order)
        parents.append(cluster)
        coo = graphs[-1].tocoo()
        size = int(cluster.max()) + 1
        coarse = scipy.sparse.csr_matrix((coo.data, (cluster[coo.row], cluster[coo.col])), shape=(size, size))
        coarse.setdiag(0)
        coarse.eliminate_zeros()
        graphs.append(coarse)
        order = np.argsort(np.asarray(coarse.sum(axis=0)).ravel(), kind="stable")
    return graphs, parents


def coarsen_mesh(faces: np.ndarray, num_verts: int, levels: int = 4, top_nodes: int | None = None) -> CoarseGraphs:
    """Coarsen a triangle mesh ``levels`` times by heavy-edge matching, with fake nodes so each level halves.

    faces: (F, 3) int; num_verts: V. top_nodes: pad the coarsest level with isolated fake nodes to this
    count (IntagHand's decoder sizes 63 / 126 / 252 for any hand mesh that coarsens to at most 63 nodes);
    None keeps the matching's own count. Raises ValueError when the mesh coarsens to more than top_nodes.
    Deterministic: the first level visits vertices in index order (if that leaves more than top_nodes, seeded
    random orders 0, 1, ... up to FIRST_ORDER_TRIES, as the reference's random first level), later levels by
    increasing weighted degree (stable sort), as Defferrard's code does. Returns :class:`CoarseGraphs`.
    """
    adjacency = mesh_adjacency(faces, num_verts)
    graphs, parents = _match_levels(adjacency, levels, np.arange(num_verts))
    # The top count depends on the first level's visit order; when index order leaves more than top_nodes,
    # try seeded random orders (as the reference's random first level), deterministically, in seed order.
    seed = 0
    while top_nodes is not None and graphs[-1].shape[0] > top_nodes and seed < FIRST_ORDER_TRIES:
        order = np.random.default_rng(seed).permutation(num_verts)
        graphs, parents = _match_levels(adjacency, levels, order)
        seed += 1
    perms = compute_permutations(parents, top_nodes)
    real_top = graphs[-1].shape[0]
    sizes = [len(p) for p in perms]

    laplacians, adjacencies = [], []
    for level, graph in enumerate(graphs):
        perm = perms[level]
        real = perm < graph.shape[0]
        dense = np.zeros((len(perm), len(perm)))
        sub = np.asarray(graph.todense())
        dense[np.ix_(np.flatnonzero(real), np.flatnonzero(real))] = (sub[perm[real]][:, perm[real]] > 0)
        adjacencies.append(dense)
        laplacians.append(rescale_laplacian(normalized_laplacian(scipy.sparse.csr_matrix(dense))))

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
    top_blocks = fill.reshape(len(perms[-1]), -1)
    for index in range(real_top, len(top_blocks)):  # padded top nodes copy a real top node's subtree
        top_blocks[index] = top_blocks[index - real_top]
    fill = top_blocks.reshape(-1)
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
