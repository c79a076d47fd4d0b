"""`client.images.generate` of the official `openai` Python client against `trt-diff serve` on an image bundle
(run by tests/server_openai.rs).

    python tests/py/openai_images.py BASE_URL OUT.png

Asks for one 64x64 image (seed 1, 4 steps through `extra_body`) as b64_json and writes the PNG it got to OUT.png;
then checks that a url response format is refused with a 400 the client raises as BadRequestError.
"""
import base64
import sys

import openai

base, out = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=300)
r = client.images.generate(
    model="flux",
    prompt="a watercolor painting of a fox in the snow",
    size="64x64",
    n=1,
    response_format="b64_json",
    extra_body={"seed": 1, "steps": 4},
)
assert len(r.data) == 1 and r.data[0].b64_json, r
with open(out, "wb") as f:
    f.write(base64.b64decode(r.data[0].b64_json))
try:
    client.images.generate(model="flux", prompt="x", size="64x64", response_format="url")
    raise SystemExit("response_format url was accepted")
except openai.BadRequestError as e:
    assert "b64_json" in str(e), e
print("all ok")
