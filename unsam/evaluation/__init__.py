"""Evaluation: class-agnostic COCO AR/AP for whole-image output, prompt mIoU for prompts."""
