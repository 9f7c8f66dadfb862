from qlora_pipeline.config.schema import PipelineConfig, load_params, validate_dict

__all__ = ["PipelineConfig", "load_params", "validate_dict"]
