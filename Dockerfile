# One image for web and worker: `modelbay web` / `modelbay worker` pick the role.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY tasks ./tasks
COPY web ./web
COPY workers ./workers
RUN pip install --no-cache-dir .
ENV MODELBAY_MODELS_DIR=/models MODELBAY_RUN_DIR=/run/modelbay
EXPOSE 8080
CMD ["modelbay", "web", "--port", "8080"]
