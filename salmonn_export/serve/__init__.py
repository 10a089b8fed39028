"""Deploy: the OpenAI-compatible audio server."""
