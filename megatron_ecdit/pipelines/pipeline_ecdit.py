"""`ECDiTPipeline`: text -> image with an exported EC-DiT, as diffusers users call a pipeline.

    pipe = ECDiTPipeline.from_pretrained("exported/")
    images = pipe(["a red circle", "a blue square"], num_inference_steps=25, guidance_scale=4.0,
                  generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images

Components: the transformer (`ECDiTTransformer2DModel`), a flow-matching scheduler
(`FlowMatchEulerDiscreteScheduler` with the run's sampling shift), the frozen text encoder and
its tokenizer (transformers), and the VAE (`AutoencoderKL`), or none when the run trained in
pixel space. It samples as the training job does (`ecdit-sample`): the same text encoding
(`encoders.TextEncoder`: states padded to the run's length, zero past the caption), the uniform
grid of sigmas 1, 1 - 1/N, ..., 1/N shifted by the scheduler, Euler steps down to 0, and
classifier-free guidance on one batch [conditional; unconditional] combined by
`diffusion.cfg_combine`, the unconditional text being the empty caption (or the negative
prompt). With one generator per image (diffusers' convention) an image depends on its seed
only: the seeds `ecdit-sample` records give its images again, within a level of 255.

`export_pipeline` writes the whole pipeline folder from a training checkpoint: model_index.json,
`transformer/` (streamed, sharded: `checkpoint.consolidated.write_transformer`), `scheduler/`,
`text_encoder/`, `tokenizer/` and `vae/`, all under a temporary name until complete.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from megatron_ecdit.checkpoint import consolidated
from megatron_ecdit.checkpoint.exported import DEFAULT_MAX_SHARD_SIZE, staged
from megatron_ecdit.diffusion.sampling import cfg_combine
from megatron_ecdit.encoders.text import TextEncoder
from megatron_ecdit.encoders.vae import DiffusersVAE
from megatron_ecdit.pipelines.transformer_ecdit import ECDiTTransformer2DModel


class ECDiTPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["vae"]

    def __init__(self, transformer: ECDiTTransformer2DModel,
                 scheduler: FlowMatchEulerDiscreteScheduler, text_encoder, tokenizer,
                 vae: Optional[AutoencoderKL] = None, text_max_length: int = 32):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler,
                              text_encoder=text_encoder, tokenizer=tokenizer, vae=vae)
        self.register_to_config(text_max_length=text_max_length)
        # Images in [-1, 1] (decoded latents, or the latents themselves in pixel space) -> PIL
        self.image_processor = VaeImageProcessor(do_resize=False)

    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The text encoder's states (B, L, D) and mask (B, L), encoded as in training."""
        encoder = TextEncoder.from_components(self.text_encoder, self.tokenizer,
                                              self.config.text_max_length)
        return encoder.encode(prompts)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], negative_prompt: str = "",
                 num_inference_steps: int = 25, guidance_scale: float = 4.0,
                 num_images_per_prompt: int = 1,
                 generator: Optional[torch.Generator | list[torch.Generator]] = None,
                 latents: Optional[torch.Tensor] = None, output_type: str = "pil",
                 return_dict: bool = True):
        """Images for `prompt` (one or a list; each `num_images_per_prompt` times).

        generator: one torch.Generator, or one per image (then each image depends on its own
        generator only). latents: the starting noise (B, C, H, W) instead of drawing it.
        output_type: "pil" (a list of PIL images), "np" or "pt"."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        device = self._execution_device
        config = self.transformer.config
        shape = (len(prompts), config.in_channels, config.input_size, config.input_size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device,
                                   dtype=torch.float32)
        latents = latents.to(device, torch.float32)
        cond = self.encode_prompt(prompts)
        guided = guidance_scale != 1.0
        if guided:  # one batch: [conditional; unconditional], as the training job samples
            uncond = self.encode_prompt([negative_prompt] * len(prompts))
            cond = tuple(torch.cat([c, u]) for c, u in zip(cond, uncond))
        # The training job's grid 1, 1 - 1/N, ..., 1/N (then 0); the scheduler shifts it.
        sigmas = np.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps)
        self.scheduler.set_timesteps(sigmas=sigmas, device=device)
        for i, timestep in enumerate(self.progress_bar(self.scheduler.timesteps)):
            sigma = self.scheduler.sigmas[i].to(device)
            x = torch.cat([latents, latents]) if guided else latents
            t = sigma.expand(x.shape[0]).float()
            velocity = self.transformer(x, t, *cond).sample.float()
            if guided:
                velocity = cfg_combine(*velocity.chunk(2), guidance_scale)
            latents = self.scheduler.step(velocity, timestep, latents).prev_sample
        images = latents if self.vae is None else DiffusersVAE.from_model(self.vae).decode(latents)
        images = self.image_processor.postprocess(images.float().cpu(), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


def export_pipeline(checkpoint: str | os.PathLike, out: str | os.PathLike, *,
                    weights: str = "ema", dtype: str = "fp32",
                    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                    progress: bool = True) -> Path:
    """A training checkpoint -> a diffusers pipeline folder (see the module's docstring)."""
    from accelerate import init_empty_weights

    with staged(out) as tmp:
        cfg = consolidated.write_transformer(checkpoint, tmp / "transformer", weights=weights,
                                             dtype=dtype, max_shard_size=max_shard_size,
                                             progress=progress)
        with init_empty_weights():  # the weights are written already; the class is recorded
            transformer = ECDiTTransformer2DModel.from_config(
                ECDiTTransformer2DModel.load_config(tmp / "transformer"))
        scheduler = FlowMatchEulerDiscreteScheduler(shift=cfg.diffusion.sample_shift)
        text = TextEncoder(cfg.text_encoder.path, cfg.text_encoder.tokenizer_path,
                           cfg.text_encoder.max_length, cache_size=0)
        vae = None
        if cfg.vae.path is not None:
            vae = DiffusersVAE(cfg.vae.path).vae
            vae.save_pretrained(tmp / "vae")
        scheduler.save_pretrained(tmp / "scheduler")
        text.model.save_pretrained(tmp / "text_encoder")
        text.tokenizer.save_pretrained(tmp / "tokenizer")
        pipe = ECDiTPipeline(transformer, scheduler, text.model, text.tokenizer, vae,
                             text_max_length=cfg.text_encoder.max_length)
        pipe.save_config(tmp)  # model_index.json: each component's library and class
    return Path(out)
