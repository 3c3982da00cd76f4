-- wrk: POST a short non-streaming completion (demo model, 4 tokens).
wrk.method = "POST"
wrk.body = '{"prompt": "Hello", "max_tokens": 4}'
wrk.headers["Content-Type"] = "application/json"
