"""RL fine-tuning of Vision-Language-Action models as a service system."""
