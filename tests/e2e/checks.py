"""The one check helper of the SDK end-to-end scripts (openai_sdk.py, anthropic_sdk.py): one line per check,
exit non-zero at the first failure, a closing "N passed, 0 failed" line that the Rust harness looks for."""
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


def done():
    print(f"{passed} passed, 0 failed")
