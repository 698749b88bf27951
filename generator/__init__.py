"""AttentionHand: text-driven, mesh-conditioned hand image generation (paper §3; shared/design/ARCHITECTURE.md).

Importing this package loads nothing and writes nothing; import the submodules you use.

One file per stage:
- `generator.text`: the offline CLIP tokenizer of SD 1.5, built from open_clip's shipped BPE file into
  `hands.paths.cache_dir()/clip_tokenizer` on first use: `load_clip_tokenizer(folder=None)`.
- `generator.tagging`: H_tag. `hand_token_indices(prompt, tokenizer=None) -> list[int]` (CLIP positions, start
  token = 0, every BPE token of every hand-related word; [] means "skip TAS for this prompt").
- `generator.text_attention` (TAS): `AttentionStore`, `recording(unet, store)` (processors installed by module
  path), `cross_attention_layers(unet, latent_hw, attention_hw)`, `tas_attention_maps` (early-exit forward),
  `tas_loss` / `tas_loss_batch` / `token_mask`, `TasSchedule`, `apply_tas` (Eq. 4).
- `generator.visual_attention` (VAS): `GuidanceModule` (phi_g, one ControlNet from the frozen UNet),
  `stack_branches` / `split_branches` (global rows, then local rows), `predict_noise` (Eq. 6).
- `generator.model`: `GeneratorConfig` (+ `TinyArchitecture`, `SamplingConfig`), `load_config(name_or_path,
  overrides)`, `build_components(config) -> GeneratorComponents`, `load_sd_components(sd_path)`,
  `save_components(components, folder)` (SD diffusers layout + guidance/), `encode_prompts`.
- `generator.pipeline`: `AttentionHandPipeline(...)(mesh_images, local_mesh_images, prompts, ...)
  -> AttentionHandOutput` (images (B, 3, H, W) in [0, 1] on the inputs' device).

A training step of the guidance module, in this API (paper Eqs. 1-9; what `generator.train` is to do):

    K = components.encode_prompts(prompts)                                    # (B, 77, D)
    x0 = stack_branches(vae_encode(rgb_global), vae_encode(rgb_local))        # (2B, 4, h, w), local from the local RGB
    x_t = scheduler.add_noise(x0, eps, t)                                     # eps, t per row
    with recording(unet, store):
        x_hat, _ = apply_tas(unet, store, x_t, t, K.repeat(2, 1, 1), token_mask(tokens * 2), step_sizes)
    eps_hat = (x_hat - sqrt(alpha_bar_t) * x0) / sqrt(1 - alpha_bar_t)        # residual noise (the Eq. 7-8 target)
    pred = predict_noise(unet, guidance, x_hat, t, K.repeat(2, 1, 1), stack_branches(mesh_global, mesh_local))
    loss_global, loss_local = per-branch MSE(pred, eps_hat) via split_branches; L = lambda_G L_G + lambda_L L_L
"""
