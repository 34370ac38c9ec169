"""Layer shapes shared by the kernel benchmarks: (name, T, d_in, d_out) of a ViT-B/16 and a
ViT-S/16 block at 224x224 (T = 197 tokens)."""

VIT_B_BLOCK = [
    ("vit_b.qkv", 197, 768, 2304),
    ("vit_b.proj", 197, 768, 768),
    ("vit_b.fc1", 197, 768, 3072),
    ("vit_b.fc2", 197, 3072, 768),
]

VIT_S_BLOCK = [
    ("vit_s.qkv", 197, 384, 1152),
    ("vit_s.proj", 197, 384, 384),
    ("vit_s.fc1", 197, 384, 1536),
    ("vit_s.fc2", 197, 1536, 384),
]
