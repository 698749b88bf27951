"""P4: global + local mesh images of two-hand samples, `hands.render` (pure torch) over moderngl (OpenGL through
EGL; on a CPU machine Mesa's llvmpipe software rasterizer).

Both sides get the same inputs (camera-space vertices of both hands, MANO faces, intrinsics K) and give the same
outputs: (B, 3, S, S) float images in [0, 1] (black background, right / left hands in their colours, normal
shading) and the local images cropped from them with `hands.render.crop_local` around the union of the hand
boxes, as mixing.source does. moderngl: one standalone context, vertex / index buffers made once, the vertices
uploaded per sample (as a renderer fed by a training loop must), depth test, flat normal shading from screen-space
derivatives of the camera-space position, read back into a torch tensor. Context creation is not timed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .common import interleaved, mib

_VERTEX_SHADER = """
#version 330
uniform vec4 intrinsics;   // fx, fy, cx, cy (pixels)
uniform vec2 size;         // W, H (pixels)
uniform vec2 near_far;     // metres
in vec3 in_pos;            // camera space, metres (x right, y down, z forward)
in vec3 in_color;
out vec3 v_pos;
out vec3 v_color;
void main() {
    float z = in_pos.z;
    float u = intrinsics.x * in_pos.x / z + intrinsics.z;
    float v = intrinsics.y * in_pos.y / z + intrinsics.w;
    // row v of the read-back image is pixel row v (GL's first row is the bottom one)
    vec2 ndc = vec2(2.0 * u / size.x - 1.0, 2.0 * v / size.y - 1.0);
    float depth = 2.0 * (z - near_far.x) / (near_far.y - near_far.x) - 1.0;
    gl_Position = vec4(ndc * z, depth * z, z);
    v_pos = in_pos;
    v_color = in_color;
}
"""
_FRAGMENT_SHADER = """
#version 330
uniform vec3 light_dir;
uniform float ambient;
in vec3 v_pos;
in vec3 v_color;
out vec4 f_color;
void main() {
    vec3 n = normalize(cross(dFdx(v_pos), dFdy(v_pos)));
    float lambert = abs(dot(n, normalize(light_dir)));
    f_color = vec4(v_color * (ambient + (1.0 - ambient) * lambert), 1.0);
}
"""


@dataclass
class RenderSettings:
    batch: int = 16
    size: int = 256
    repeats: int = 7


def two_hand_batch(batch: int, size: int, seed: int = 0):
    """`batch` two-hand samples in front of a camera: (right_verts_cam (B,778,3), left_verts_cam (B,778,3),
    faces_right (F,3), faces_left (F,3), K (B,3,3), union_box (B,4) px), metres, procedural MANO hands."""
    from hands.camera import bbox_from_points, make_intrinsics, project
    from hands.mano import HandModel

    g = torch.Generator().manual_seed(seed)
    model = HandModel()
    with torch.no_grad():
        pose_r = torch.randn(batch, 48, generator=g) * 0.3
        pose_l = torch.randn(batch, 48, generator=g) * 0.3
        pose_r[:, :3] = pose_l[:, :3] = 0.0
        shape = torch.randn(batch, 10, generator=g) * 0.5
        depth = 0.45 + 0.1 * torch.rand(batch, 1, generator=g)
        trans_r = torch.cat([torch.full((batch, 1), -0.05), torch.zeros(batch, 1), depth], 1)
        trans_l = torch.cat([torch.full((batch, 1), 0.05), torch.zeros(batch, 1), depth], 1)
        right = model("right", pose_r, shape, trans_r).verts
        left = model("left", pose_l, shape, trans_l).verts
    K = make_intrinsics(size * 1.2, (size / 2, size / 2)).expand(batch, 3, 3).contiguous()
    both = torch.cat([right, left], 1)
    box = bbox_from_points(project(both, K))
    return right, left, model.faces_for("right"), model.faces_for("left"), K, box


class ModernGLRenderer:
    """The moderngl side of P4: renders both hands of each sample into an (S, S) framebuffer and reads back."""

    def __init__(self, faces_right: torch.Tensor, faces_left: torch.Tensor, num_right: int, num_left: int,
                 size: int, right_color=(0.9, 0.35, 0.25), left_color=(0.25, 0.45, 0.9)):
        import moderngl

        self.ctx = moderngl.create_standalone_context(backend="egl")
        self.renderer = self.ctx.info["GL_RENDERER"]
        self.size = size
        self.program = self.ctx.program(vertex_shader=_VERTEX_SHADER, fragment_shader=_FRAGMENT_SHADER)
        self.program["size"].value = (float(size), float(size))
        self.program["near_far"].value = (0.01, 10.0)
        self.program["light_dir"].value = (0.0, 0.0, -1.0)
        self.program["ambient"].value = 0.3
        faces = torch.cat([faces_right.long(), faces_left.long() + num_right]).to(torch.int32).numpy()
        colors = np.concatenate([np.tile(np.asarray(right_color, "f4"), (num_right, 1)),
                                 np.tile(np.asarray(left_color, "f4"), (num_left, 1))])
        self.num_verts = num_right + num_left
        self.vbo = self.ctx.buffer(reserve=self.num_verts * 3 * 4)
        self.cbo = self.ctx.buffer(colors.tobytes())
        self.ibo = self.ctx.buffer(faces.tobytes())
        self.vao = self.ctx.vertex_array(self.program, [(self.vbo, "3f", "in_pos"), (self.cbo, "3f", "in_color")],
                                         index_buffer=self.ibo)
        self.fbo = self.ctx.simple_framebuffer((size, size), components=3)

    def render(self, right_verts_cam: torch.Tensor, left_verts_cam: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) float images in [0, 1] (black background)."""
        import moderngl

        verts = torch.cat([right_verts_cam, left_verts_cam], 1).float().cpu().numpy()
        K = K.cpu()
        out = np.empty((len(verts), self.size, self.size, 3), np.uint8)
        self.fbo.use()
        self.ctx.enable(moderngl.DEPTH_TEST)
        for i, v in enumerate(verts):
            self.vbo.write(np.ascontiguousarray(v))
            self.program["intrinsics"].value = (float(K[i, 0, 0]), float(K[i, 1, 1]), float(K[i, 0, 2]),
                                                float(K[i, 1, 2]))
            self.fbo.clear(0.0, 0.0, 0.0, 1.0, depth=1.0)
            self.vao.render(moderngl.TRIANGLES)
            out[i] = np.frombuffer(self.fbo.read(components=3, alignment=1), np.uint8).reshape(self.size,
                                                                                                self.size, 3)
        return torch.from_numpy(out).permute(0, 3, 1, 2).float().div_(255.0)

    def release(self) -> None:
        self.ctx.release()


def run_p4(settings: RenderSettings, device: torch.device) -> dict:
    """Seconds for global + local mesh images of `batch` samples, hands.render over moderngl."""
    from hands.render import crop_local, render_hands

    right, left, faces_r, faces_l, K, box = two_hand_batch(settings.batch, settings.size)
    right, left, K, box = right.to(device), left.to(device), K.to(device), box.to(device)
    gl = ModernGLRenderer(faces_r, faces_l, right.shape[1], left.shape[1], settings.size)
    size = (settings.size, settings.size)

    def ours():
        image = render_hands(right, left, faces_r.to(device), faces_l.to(device), K, size).image
        return image, crop_local(image, box, settings.size, scale=1.2)

    def moderngl_side():
        image = gl.render(right, left, K).to(device)
        return image, crop_local(image, box, settings.size, scale=1.2)

    with torch.no_grad():
        ours_image, _ = ours()
        gl_image, _ = moderngl_side()
        # sanity: both draw the same silhouettes (pixel-level coverage agreement)
        agree = float(((ours_image.amax(1) > 0) == (gl_image.amax(1) > 0)).float().mean())
        timings = interleaved({"hands.render": ours, "moderngl": moderngl_side}, settings.repeats, device)
    renderer = gl.renderer
    gl.release()
    ratio = timings.median("hands.render") / timings.median("moderngl")
    return {
        "ratio": round(ratio, 3), "target": 3.0, "met": bool(ratio <= 3.0), "better": "lower",
        "median_s": {n: round(timings.median(n), 4) for n in timings.seconds},
        "seconds": {n: [round(s, 4) for s in v] for n, v in timings.seconds.items()},
        "ms_per_sample": {n: round(1000 * timings.median(n) / settings.batch, 2) for n in timings.seconds},
        "peak_mib": {n: mib(b) for n, b in timings.peak_bytes.items()},
        "peak_growth_mib": {n: mib(b) for n, b in timings.peak_growth_bytes.items()},
        "settings": {"batch": settings.batch, "size": settings.size, "repeats": settings.repeats,
                     "outputs": "global + local (crop_local) mesh images"},
        "gl_renderer": renderer,
        "silhouette_agreement": round(agree, 4),
    }
