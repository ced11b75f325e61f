"""Running the model over time: the streaming chunker (tokens -> flow + HiFT chunks) and the scheduler thread
that interleaves the LLM steps and chunks of concurrent requests. The networks themselves live in ``model/``."""
