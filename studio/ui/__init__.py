"""The only part of the studio that imports Streamlit: session state, caching, progress and charts."""
