import torch

from hands import camera


def test_project_by_hand():
    K = camera.make_intrinsics((500.0, 400.0), (64.0, 48.0))
    points = torch.tensor([[[0.1, -0.2, 1.0], [0.0, 0.0, 2.0]]])
    uv = camera.project(points, K.unsqueeze(0))
    torch.testing.assert_close(uv, torch.tensor([[[114.0, -32.0], [64.0, 48.0]]]))


def test_bbox_from_points_respects_valid_and_empty_rows():
    pts = torch.tensor([[[1.0, 2.0], [5.0, 7.0], [100.0, 100.0]], [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]])
    valid = torch.tensor([[True, True, False], [False, False, False]])
    box = camera.bbox_from_points(pts, valid)
    torch.testing.assert_close(box, torch.tensor([[1.0, 2.0, 5.0, 7.0], [0.0, 0.0, 0.0, 0.0]]))


def test_square_and_scale_bbox_keep_centre():
    box = torch.tensor([[10.0, 20.0, 30.0, 60.0]])
    sq = camera.square_bbox(box)
    torch.testing.assert_close(sq, torch.tensor([[0.0, 20.0, 40.0, 60.0]]))
    torch.testing.assert_close(camera.scale_bbox(sq, 2.0), torch.tensor([[-20.0, 0.0, 60.0, 80.0]]))
    wide = camera.square_bbox(box, aspect=0.75)  # width / height = 3 / 4
    w, h = wide[0, 2] - wide[0, 0], wide[0, 3] - wide[0, 1]
    torch.testing.assert_close(w / h, torch.tensor(0.75))


def test_crop_affine_maps_box_corners_and_image_content():
    box = torch.tensor([[8.0, 8.0, 24.0, 24.0]])  # 16x16 box, pixel centres 8.5..23.5 cover it
    A = camera.bbox_crop_affine(box, (32, 32))
    corners = torch.tensor([[[8.0, 8.0], [24.0, 24.0]]])
    torch.testing.assert_close(camera.apply_affine(corners, A), torch.tensor([[[-0.5, -0.5], [31.5, 31.5]]]))
    image = torch.zeros(1, 1, 32, 32)
    image[0, 0, 16, 16] = 1.0  # source pixel centre (16, 16) maps to crop (15.5, 15.5)
    crop = camera.crop_image(image, A, (32, 32))
    peak = (crop[0, 0] == crop[0, 0].max()).nonzero()
    assert ((peak.float() - torch.tensor([15.5, 15.5])).abs() <= 0.5).all()
    # the inverse maps crop pixels back
    torch.testing.assert_close(camera.apply_affine(camera.apply_affine(corners, A), camera.invert_affine(A)), corners)


def test_crop_flip_and_rotation():
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    A = camera.bbox_crop_affine(box, (10, 10), flip=True)
    p = camera.apply_affine(torch.tensor([[[0.0, 5.0]]]), A)  # left edge -> right edge
    torch.testing.assert_close(p, torch.tensor([[[9.5, 4.5]]]))
    A = camera.bbox_crop_affine(box, (10, 10), rotation_deg=90.0)
    # a point right of the centre moves above it after a counter-clockwise turn (y down)
    p = camera.apply_affine(torch.tensor([[[9.0, 5.0]]]), A)
    torch.testing.assert_close(p, torch.tensor([[[4.5, 0.5]]]), atol=1e-5, rtol=0)


def test_transform_intrinsics_commutes_with_projection():
    K = camera.make_intrinsics((300.0, 300.0), (50.0, 40.0)).unsqueeze(0)
    pts = torch.randn(1, 20, 3) * 0.05 + torch.tensor([0.0, 0.0, 0.6])
    A = camera.bbox_crop_affine(torch.tensor([[20.0, 10.0, 80.0, 70.0]]), (64, 64), rotation_deg=25.0, flip=True)
    direct = camera.apply_affine(camera.project(pts, K), A)
    via_K = camera.project(pts, camera.transform_intrinsics(K, A))
    torch.testing.assert_close(via_K, direct, atol=1e-4, rtol=0)


def test_inverse_3x3_is_the_inverse_of_intrinsics_and_affines():
    gen = torch.Generator().manual_seed(0)
    K = camera.make_intrinsics((500.0, 480.0), (320.0, 240.0)).double()
    K[0, 1] = 2.0  # a skew: still upper triangular
    A = camera.affine_to_3x3(camera.bbox_crop_affine(torch.tensor([10.0, 20.0, 110.0, 140.0]), (64, 48))).double()
    rotated = torch.tensor([[0.6, -0.8, 5.0], [0.8, 0.6, -3.0], [0.0, 0.0, 1.0]], dtype=torch.float64) @ K
    batch = torch.randn(4, 3, 3, generator=gen, dtype=torch.float64) + 3 * torch.eye(3, dtype=torch.float64)
    for matrix in (K, A, rotated, batch):
        torch.testing.assert_close(camera.inverse_3x3(matrix), torch.linalg.inv(matrix))
