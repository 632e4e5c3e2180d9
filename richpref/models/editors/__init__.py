"""Image editors, one module per kind (`edit.kind`): ControlNet img2img, InstructPix2Pix, FLUX.1 Kontext,
Qwen-Image-Edit. `richpref.models.editor` picks and loads one from a config."""
