"""Call the cl-release gateway with the official ``openai`` Python client, unchanged.

    export CL_RELEASE_TOKEN=...            # the gateway's bearer token
    cl-release -C REPO serve &             # http://127.0.0.1:8765
    python scripts/openai_client.py [--url http://127.0.0.1:8765] [--model champion] [--user alice]

``model`` is ``champion``, ``challenger``, a served version (``1.2.0``) or the project name (the A/B
router picks, sticky on ``user``). The answer's ``id`` is the request id: send feedback with it.
``openai`` is a dev dependency of cl-release (``pip install openai``), not a runtime one.
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.request

from openai import OpenAI


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8765")
    ap.add_argument("--model", default="champion")
    ap.add_argument("--user", default="alice")
    ap.add_argument("--question", default="What is the IDLH of ammonia?")
    args = ap.parse_args()
    token = os.environ["CL_RELEASE_TOKEN"]
    client = OpenAI(base_url=f"{args.url}/v1", api_key=token)

    print("served:", ", ".join(f"{m.id}" for m in client.models.list()))

    # A plain completion; with_raw_response shows the gateway's headers too.
    raw = client.chat.completions.with_raw_response.create(
        model=args.model, user=args.user, max_tokens=32, temperature=0,
        messages=[{"role": "user", "content": args.question}])
    answer = raw.parse()
    print(f"{raw.headers['x-cl-release-version']} answered ({answer.id}): {answer.choices[0].message.content!r}")

    # The same, streamed.
    parts = []
    for chunk in client.chat.completions.create(model=args.model, user=args.user, max_tokens=32, temperature=0,
                                                stream=True, messages=[{"role": "user", "content": args.question}]):
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    print(f"streamed ({chunk.id}): {''.join(parts)!r}")

    # Feedback on the first answer: POST /feedback with its id (the openai client has no such call).
    req = urllib.request.Request(f"{args.url}/feedback", method="POST",
                                 data=json.dumps({"request_id": answer.id, "thumbs": "up"}).encode(),
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        print("feedback:", json.loads(r.read()))


if __name__ == "__main__":
    main()
