"""The browser target's runtime side: npm packages, a local page server, chromium driven by
playwright, the harness and chat pages (see npm, static_server, browser, serve)."""
