"""``python -m recon.archs.dir.check_reference --reference DIR_CHECKOUT``: compare this DIR with the reference's own
code, numerically.

DIR_CHECKOUT is a checkout of PengfeiRen96/DIR (MIT; e.g. ``git clone https://github.com/PengfeiRen96/DIR``). Its
``models/dir.py`` is imported with four stubs, so that neither MANO files, pytorch3d, manopth, einops, OpenCV nor a
download is needed: manopth's ``ManoLayer`` becomes a layer that decodes (6D root, 45 PCA, 10 betas) exactly as
:meth:`recon.archs.dir.DIR.decode` does (the project's hand model, joints regressed from the mesh, rooted at the
wrist), ``utils.utils`` keeps only ``projection_batch_xy``, torchvision's ResNet-50 is built without weights, and the
mesh losses (which call ``.cuda()``) are replaced by nothing (the forward pass does not use them).

It prints, then checks (exit status 1 when a check fails):

1. the parameter count of the reference's ``DIR(21, mano_path)`` and of ours at paper size, and the difference
   (the classifier and the skipped transformer blocks, see docs/dir.md);
2. the whole forward pass: the reference built with random weights and random BatchNorm statistics, its state dict
   converted onto ours (:mod:`recon.archs.dir.convert`), both in eval mode on the same random images: every stage's
   vertices, 2D joints and offset, and the segmentation and dense maps (relative to their magnitude);
3. manopth's robust 6D and DIR's ``SmoothL1Loss`` against ours.

It runs the reference's code in this process: only point it at a checkout you trust.
"""
from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

__all__ = ["main"]


def _install_stubs(decode_hand) -> None:
    """Stub modules the reference imports but this comparison must not need (see the module docstring)."""
    einops = types.ModuleType("einops")
    einops.rearrange = einops.repeat = None  # used only on code paths DIR does not take
    sys.modules.setdefault("einops", einops)

    class StubMano(nn.Module):
        def __init__(self, *args, side: str = "right", **kwargs):
            super().__init__()
            self.side = side
            # fix_shape() compares the two sides' shapedirs: make them differ so that it leaves them alone
            self.th_shapedirs = torch.zeros(778, 3, 10) + (1.0 if side == "left" else 0.0)
            self.th_faces = torch.zeros(1538, 3, dtype=torch.long)

        def forward(self, pose: torch.Tensor, betas: torch.Tensor):
            return decode_hand(self.side, pose, betas)

    manopth = types.ModuleType("manopth")
    manolayer = types.ModuleType("manopth.manolayer")
    manolayer.ManoLayer = StubMano
    sys.modules["manopth"], sys.modules["manopth.manolayer"] = manopth, manolayer

    utils = types.ModuleType("utils.utils")

    def projection_batch_xy(scale, trans2d, label3d):
        if scale.dim() == 1:
            scale = scale[:, None, None]
        return scale * label3d[..., :2] + trans2d[:, None]

    utils.projection_batch_xy = projection_batch_xy
    sys.modules["utils.utils"] = utils


def _difference(ours: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(max |ours - reference|, max |reference|)."""
    return float((ours - reference).abs().max()), float(reference.abs().max())


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recon.archs.dir.check_reference", description=__doc__.split("\n")[0])
    parser.add_argument("--reference", required=True, help="a checkout of PengfeiRen96/DIR")
    parser.add_argument("--mano-dir", help="MANO folder for both models' hand model (default: the procedural hand)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    reference = Path(args.reference)
    if not (reference / "models" / "dir.py").is_file():
        print(f"check_reference: error: --reference {reference}: no models/dir.py (give a checkout of PengfeiRen96/DIR)",
              file=sys.stderr)
        return 2

    from hands.mano import HandModel
    from hands.rotation import matrix_to_axis_angle
    from recon.archs.dir.convert import convert_reference_state_dict
    from recon.archs.dir.heads import robust_rot6d_to_matrix
    from recon.archs.dir.losses import smooth_l1
    from recon.archs.dir.model import DIR, IMAGENET_MEAN, IMAGENET_STD, _mano_arrays, joints_from_verts
    from hands.sample import Camera

    hand_model = HandModel(mano_dir=args.mano_dir)
    components = dict(zip(("right", "left"), _mano_arrays((str(hand_model.paths["right"]), str(hand_model.paths["left"])))))

    def decode_hand(side: str, pose: torch.Tensor, betas: torch.Tensor):
        root = matrix_to_axis_angle(robust_rot6d_to_matrix(pose[:, :6]))
        full = torch.cat([root, pose[:, 6:51] @ torch.as_tensor(components[side])], -1)
        verts = hand_model(side, full, betas).verts
        joints = joints_from_verts(hand_model, side, verts)
        return verts - joints[:, :1], joints - joints[:, :1]

    _install_stubs(decode_hand)
    sys.path.insert(0, str(reference))
    import torchvision

    import models.dir as reference_dir  # noqa: E402  (the reference's module, from --reference)

    reference_dir.resnet50 = lambda weights=None: torchvision.models.resnet50(weights=None)
    reference_dir.NormalVectorLoss = reference_dir.EdgeLengthLoss = lambda faces: nn.Identity()
    torch.manual_seed(args.seed)
    ref = reference_dir.DIR(21, str(hand_model.mano_dir), 0).eval()
    for module in ref.modules():  # non-trivial running statistics, so that the comparison sees them
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            module.running_mean.normal_(0.0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    ours = DIR(mano_dir=args.mano_dir).eval()
    failures = []

    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    print(f"parameters: reference {count(ref):,}, ours {count(ours):,}, difference {count(ref) - count(ours):,} "
          f"(classifier {count(ref.backbone.fc):,} + skipped transformer blocks "
          f"{count(ref.decoder.projecter_4.interaction.STEblocks[0]) + count(ref.decoder.projecter_3.interaction.STEblocks[0]):,})")
    unused = count(ref.backbone.fc) + count(ref.decoder.projecter_4.interaction.STEblocks[0]) * 2
    if count(ref) - count(ours) != unused:
        failures.append("parameter count")

    ours.load_state_dict(convert_reference_state_dict(ref.state_dict()))
    image = torch.rand(args.batch, 3, 256, 256)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    batch = types.SimpleNamespace(image=image, camera=Camera(K=torch.eye(3).expand(args.batch, 3, 3)))
    with torch.no_grad():
        features = ref.backbone((image - mean) / std)  # the reference's forward, without its .cuda() calls
        initial = ref.init_regressor(features[-1])
        decoded = ref.decoder(features, initial)
        out = ours(batch)
    rows = []
    for index, (theirs, mine) in enumerate(zip([initial] + decoded["result_list"], out.extras["stages"])):
        for side in ("right", "left"):
            rows.append((f"stage {index} {side} vertices (m)", *_difference(mine[side]["verts"], theirs[f"pd_mesh_xyz_{side}"])))
            rows.append((f"stage {index} {side} 2D joints", *_difference(mine[side]["joints_uv"], theirs[f"pd_joint_uv_{side}"])))
        rows.append((f"stage {index} offset", *_difference(mine["offset"], theirs["pd_offset"])))
    rows.append(("segmentation logits", *_difference(out.extras["seg"], decoded["seg"])))
    rows.append(("dense map", *_difference(out.extras["dense"], decoded["dense"])))

    rot6d_source = (reference / "manopth" / "manopth" / "rot6d.py").read_text()
    namespace: dict = {"torch": torch}
    exec(compile(rot6d_source, "rot6d.py", "exec"), namespace)  # noqa: S102 (the reference's own function)
    rot6d = torch.randn(64, 6)
    rows.append(("robust 6D", *_difference(robust_rot6d_to_matrix(rot6d), namespace["robust_compute_rotation_matrix_from_ortho6d"](rot6d))))
    from models.loss import SmoothL1Loss  # noqa: E402

    a, b = torch.randn(4, 21, 3) * 0.02, torch.randn(4, 21, 3) * 0.02
    rows.append(("SmoothL1", *_difference(smooth_l1(a, b), SmoothL1Loss()(a, b))))
    print(f"{'quantity':32s} {'max |ours - reference|':>24s} {'max |reference|':>16s}")
    for name, difference, scale in rows:
        ok = difference <= 1e-5 * max(scale, 1.0)
        print(f"{name:32s} {difference:24.3g} {scale:16.3g}{'' if ok else '  <- differs'}")
        if not ok:
            failures.append(name)
    if failures:
        print(f"check_reference: {len(failures)} check(s) differ: {', '.join(failures)}")
        return 1
    print("check_reference: every check agrees")
    return 0


if __name__ == "__main__":
    sys.exit(main())
