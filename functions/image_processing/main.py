"""FunctionBench image_processing: flip, rotate, filter, greyscale and resize an image with
Pillow. The original downloads an image; sandboxes have no network, so a deterministic test
image is generated (gradient plus shapes) and processed in memory."""
import io
import time

from PIL import Image, ImageDraw, ImageFilter


def _image(size):
    img = Image.linear_gradient("L").resize((size, size)).convert("RGB")
    draw = ImageDraw.Draw(img)
    for i in range(0, size, max(1, size // 8)):
        draw.ellipse((i, i, i + size // 6, i + size // 6), outline=(255, i % 256, 0), width=3)
    return img


def handler(event, context):
    size = int(event.get("size", 512))
    img = _image(size)
    start = time.perf_counter()
    outputs = {
        "flip": img.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        "rotate": img.rotate(90),
        "filter": img.filter(ImageFilter.BLUR),
        "gray": img.convert("L"),
        "resize": img.resize((size // 2, size // 2)),
    }
    sizes = {}
    for name, out in outputs.items():
        buf = io.BytesIO()
        out.save(buf, format="PNG")
        sizes[name] = buf.tell()
    latency = time.perf_counter() - start
    return {"size": size, "png_bytes": sizes, "latency_s": latency}
