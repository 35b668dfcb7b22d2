"""OpenAI's error body, {"error": {message, type, param, code}}, for every error the server answers."""
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error answered to the client as OpenAI does; raised anywhere a request is handled."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error_body(error.status, error.message, error.param, error.code), error.status,
                        headers=error.headers)


def add_error_handlers(app: FastAPI) -> None:
    """4xx and 5xx raised in the app, FastAPI's own validation errors included, leave with OpenAI's body.
    (Unexpected exceptions become 500s in middleware.HTTPGuard, which keeps the connection usable.)"""

    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return error_response(error)

    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(_from_validation(error))

    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return error_response(APIError(error.status_code, str(error.detail), headers=error.headers))

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)


def _from_validation(error: RequestValidationError) -> APIError:
    """The first of pydantic's complaints, worded for a client: which field, what was wrong."""
    first = error.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    kind = first.get("type")
    if kind == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}")
    if kind == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param)
    if kind == "missing" and param is None:
        return APIError(400, "the request needs a JSON body")
    where = f"{param}: " if param else ""
    return APIError(400, f"{where}{first['msg']}", param)
