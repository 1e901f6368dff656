"""Applications over an OpenAI-compatible server (kiln's or any other): retrieval-augmented
generation (rag), a tool-calling agent (agent), text-to-SQL (sql), and the server's guardrails
(guardrails). They speak HTTP through `client.OpenAIClient`, so they need no engine in-process."""
