"""The one check helper of the SDK end-to-end scripts (openai_sdk.py, anthropic_sdk.py): one line per check,
exit non-zero at the first failure, a closing "N passed, 0 failed" line that the Rust harness looks for; and
`data_url`, the media scripts' image parts."""
import sys

import jsonschema

passed = 0


def check(name, cond, detail=""):
    global passed
    if not cond:
        print(f"FAIL {name}: {detail}")
        sys.exit(1)
    passed += 1
    print(f"ok   {name}")


def valid(instance, schema):
    """Whether `instance` validates against the JSON Schema `schema`."""
    try:
        jsonschema.validate(instance, schema)
        return True
    except jsonschema.ValidationError:
        return False


def data_url(img, fmt="PNG"):
    """A PIL image as a `data:` URL in `fmt` (the image parts of the media scripts)."""
    import base64
    import io

    buf = io.BytesIO()
    img.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode()}"


def done():
    print(f"{passed} passed, 0 failed")
