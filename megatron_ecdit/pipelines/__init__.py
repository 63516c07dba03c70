"""diffusers integration: the EC-DiT transformer as a diffusers model and a text-to-image
pipeline over it (`from megatron_ecdit.pipelines import ECDiTPipeline`)."""

from megatron_ecdit.pipelines.pipeline_ecdit import ECDiTPipeline, export_pipeline
from megatron_ecdit.pipelines.transformer_ecdit import ECDiTTransformer2DModel

__all__ = ["ECDiTPipeline", "ECDiTTransformer2DModel", "export_pipeline"]
