"""The Nimbus server: the LangGraph Agent Server API and an OpenAI-compatible facade."""
